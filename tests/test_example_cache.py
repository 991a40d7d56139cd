"""The one cache of frozen-model outputs (bipost/example_cache.py): rows found by content in batch
order, stale or torn files rebuilt and never used, every rank rebuilding if one must, ranks' shares
completed by all-reduces, and cache files of the earlier per-kind formats still read."""

from __future__ import annotations

import json
import logging
import threading

import pytest
import torch

from bipost.data.types import PrefExample, SFTExample
from bipost.engine import LocalComm
from bipost.example_cache import ExampleCache, compute_rows, load_or_build


def pref_content(e):
    return (e.prompt_ids, e.chosen_ids, e.rejected_ids)


def sft_content(e):
    return (e.prompt_ids, e.response_ids)


def test_rows_follow_batch_order_by_content():
    """Example a owns rows 0-1, b row 2; an example with a's tokens but another row id gets a's rows."""
    a, b = SFTExample(0, (1,), (2, 3)), SFTExample(1, (4,), (5,))
    ids = torch.tensor([[1, 2], [3, 4], [5, 6]], dtype=torch.int32)
    logps = -torch.arange(6, dtype=torch.float32).view(3, 2)
    cache = ExampleCache.of([a, b], sft_content, torch.tensor([0, 2, 3]), {"ids": ids, "logps": logps})
    rows = cache.rows([b, SFTExample(7, (1,), (2, 3))])
    assert rows["ids"].tolist() == [[5, 6], [1, 2], [3, 4]]
    assert rows["logps"].tolist() == [[-4.0, -5.0], [-0.0, -1.0], [-2.0, -3.0]]
    with pytest.raises(KeyError, match="row 9"):
        cache.rows([SFTExample(9, (8,), (9,))])


def test_stale_or_broken_cache_is_rebuilt_never_used(tmp_path, caplog):
    ex = [PrefExample(0, (1,), (2,), (3,)), PrefExample(1, (4,), (5,), (6,))]
    path = tmp_path / "ref-dpo.pt"
    meta = {"data": "A", "reference": "m", "max_len": 64}
    calls = []

    def build(value):
        def f():
            calls.append(value)
            return torch.arange(3), {"logps": torch.full((2, 2), value)}
        return f

    def first(cache):
        return cache.rows(ex[:1])["logps"].tolist()

    comm = LocalComm()
    assert first(load_or_build(path, ex, pref_content, meta, build(-1.0), comm, "ref")) == [[-1.0, -1.0]]
    assert first(load_or_build(path, ex, pref_content, meta, build(-2.0), comm, "ref")) == [[-1.0, -1.0]]  # reused
    assert calls == [-1.0]
    with caplog.at_level(logging.WARNING, logger="bipost"):
        changed = dict(meta, max_len=128)  # e.g. another max_len: a different key
        assert first(load_or_build(path, ex, pref_content, changed, build(-3.0), comm, "ref")) == [[-3.0, -3.0]]
    assert "stale (changed: max_len)" in caplog.text
    path.write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="bipost"):
        assert first(load_or_build(path, ex, pref_content, changed, build(-4.0), comm, "ref")) == [[-4.0, -4.0]]
    assert "unreadable" in caplog.text
    assert calls == [-1.0, -3.0, -4.0]


def test_every_rank_rebuilds_if_one_must(tmp_path):
    """Ranks agree (an all-reduced flag) before building: a rank whose cache is valid still rebuilds
    when another rank's is not, so their collectives (sharded forwards, all-reduces) match."""
    ex = [SFTExample(0, (1,), (2,))]
    calls = []

    def build():
        calls.append(1)
        return torch.tensor([0, 1]), {"ids": torch.zeros(1, 2, dtype=torch.int32)}

    class OtherRankMustBuild(LocalComm):
        world_size = 2

        def any_rank(self, flag):
            return True  # the other rank's flag is set

    load_or_build(tmp_path / "t.pt", ex, sft_content, {"k": 2}, build, LocalComm(), "teacher")
    load_or_build(tmp_path / "t.pt", ex, sft_content, {"k": 2}, build, LocalComm(), "teacher")
    assert len(calls) == 1
    load_or_build(tmp_path / "t.pt", ex, sft_content, {"k": 2}, build, OtherRankMustBuild(), "teacher")
    assert len(calls) == 2


def test_fingerprint_is_unchanged_and_the_same_for_stored_examples():
    """``data_fingerprint`` hashes, per id sequence, its length (4 bytes little-endian) and its ids
    as int64 -- the bytes the tuple version hashed with ``array("q", ...)``, so caches written
    before the token store stay valid. An example read from a store (uint16 numpy views) hashes
    and looks up like the same tokens in tuples."""
    import hashlib
    from array import array

    import numpy as np

    from bipost.example_cache import data_fingerprint

    tuples = [PrefExample(0, (1, 500), (2,), (60000, 3)), PrefExample(1, (), (5,), (6,))]
    old = hashlib.sha256()
    for e in tuples:
        for part in (e.prompt_ids, e.chosen_ids, e.rejected_ids):
            old.update(len(part).to_bytes(4, "little") + array("q", part).tobytes())
    arrays = [PrefExample(e.row_id, *(np.asarray(p, dtype=np.uint16) for p in (e.prompt_ids, e.chosen_ids,
                                                                             e.rejected_ids))) for e in tuples]
    assert data_fingerprint(tuples, pref_content) == data_fingerprint(arrays, pref_content) == old.hexdigest()
    cache = ExampleCache.of(tuples, pref_content, torch.arange(3), {"logps": torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])})
    assert cache.rows(arrays)["logps"].tolist() == [[-1.0, -2.0], [-3.0, -4.0]]


def test_first_format_files_still_read(tmp_path):
    """A reference cache written before the shared mechanism ({"key", "meta", "logps" [N, 2]}, no
    offsets) is read as one row per example when its key matches."""
    from bipost.example_cache import _sha

    ex = [PrefExample(0, (1,), (2,), (3,)), PrefExample(1, (4,), (5,), (6,))]
    meta = {"version": 1, "data": "A"}
    torch.save({"key": _sha(meta), "meta": json.dumps(meta, sort_keys=True),
                "logps": torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])}, tmp_path / "ref-dpo.pt")
    cache = load_or_build(tmp_path / "ref-dpo.pt", ex, pref_content, meta, lambda: pytest.fail("rebuilt"),
                          LocalComm(), "ref")
    assert cache.rows(ex[::-1])["logps"].tolist() == [[-3.0, -4.0], [-1.0, -2.0]]


class ThreadRank(LocalComm):
    """Rank ``rank`` of ``world`` ranks run as threads: all_reduce_sum adds every rank's tensor."""

    def __init__(self, rank: int, world: int, barrier: threading.Barrier, box: dict):
        self.rank, self.world_size, self.barrier_, self.box = rank, world, barrier, box
        self.is_main = rank == 0
        self.calls = 0

    def all_reduce_sum(self, values):
        self.calls += 1
        self.box[(self.calls, self.rank)] = values.clone()
        self.barrier_.wait()
        total = sum(self.box[(self.calls, r)] for r in range(self.world_size))
        self.barrier_.wait()
        return total


def test_rank_shares_complete_to_the_one_rank_table():
    """Rank r computes examples r, r + 2, ...; after the all-reduces of the row counts and of the
    rows, every rank holds exactly the table one rank computes (variable rows per example, int ids),
    also with more ranks than examples (a rank without examples learns the shapes from a filler)."""
    examples = [SFTExample(i, (1,), tuple(range(2, 3 + i % 3))) for i in range(5)]

    def fn(_model, batch):  # one row per response token: [token, row id]
        xs = batch["examples"]
        seq = torch.cat([torch.full((len(e.response_ids),), j) for j, e in enumerate(xs)])
        tok = torch.cat([torch.tensor(e.response_ids) for e in xs])
        rid = torch.cat([torch.full((len(e.response_ids),), e.row_id) for e in xs])
        return {"pair": torch.stack([tok, rid], 1).to(torch.int32)}, seq

    def collate(xs):
        return {"examples": xs}

    one_offsets, one = compute_rows(examples, None, fn, collate, 2, LocalComm())
    assert one_offsets.tolist() == [0, 1, 3, 6, 7, 9]
    assert one["pair"][:, 1].tolist() == [0, 1, 1, 2, 2, 2, 3, 4, 4]
    for world, data in ((2, examples), (3, examples[:2])):
        barrier, box, results = threading.Barrier(world), {}, {}

        def run(rank):
            results[rank] = compute_rows(data, None, fn, collate, 2, ThreadRank(rank, world, barrier, box))

        threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        want_offsets, want = compute_rows(data, None, fn, collate, 2, LocalComm())
        for rank in range(world):
            offsets, got = results[rank]
            assert torch.equal(offsets, want_offsets)
            assert torch.equal(got["pair"], want["pair"]) and got["pair"].dtype == torch.int32

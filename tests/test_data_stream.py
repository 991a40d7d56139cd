"""ExampleStream: determinism, resume, batch-size/rank equivalences, wrapping; eval sharding."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from bipost.data import ExampleStream, eval_batches

N = 10


def ids_collate(examples: list[int]) -> dict:
    return {"row_ids": torch.tensor(examples)}


def stream(mbs: int, seed: int = 1, rank: int = 0, world: int = 1, shuffle: bool = True, n: int = N) -> ExampleStream:
    return ExampleStream(list(range(n)), mbs, ids_collate, seed, rank=rank, world_size=world, shuffle=shuffle)


def take(s: ExampleStream, k: int) -> list[list[int]]:
    return [s.next()["row_ids"].tolist() for _ in range(k)]


def test_deterministic_and_follows_the_scheme():
    assert take(stream(3), 7) == take(stream(3), 7)
    assert take(stream(3, seed=1), 4) != take(stream(3, seed=2), 4)
    p0 = torch.randperm(N, generator=torch.Generator().manual_seed(1 * 1_000_003 + 0)).tolist()
    p1 = torch.randperm(N, generator=torch.Generator().manual_seed(1 * 1_000_003 + 1)).tolist()
    flat = sum(take(stream(3), 4), [])
    assert flat == (p0 + p1)[:12]


def test_no_shuffle_is_identity_order():
    assert take(stream(4, shuffle=False), 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]


def test_resume_from_state_dict():
    s = stream(3)
    take(s, 5)
    state = s.state_dict()
    assert state["consumed"] == 5
    expected = take(s, 6)
    resumed = stream(3)
    resumed.load_state_dict(state)
    assert take(resumed, 6) == expected


def test_resume_with_other_micro_batch_at_step_boundary():
    s = stream(2)
    take(s, 4)  # 8 positions = one step of micro 2 x accumulation 4
    expected = take(stream(8), 2)[1]
    r = stream(8)
    r.load_state_dict(s.state_dict())
    assert r.next()["row_ids"].tolist() == expected
    r3 = stream(3)
    with pytest.raises(ValueError, match="not a whole number"):
        r3.load_state_dict(s.state_dict())


def test_resume_mismatch_is_a_clear_error():
    state = stream(3).state_dict()
    with pytest.raises(ValueError, match="num_examples=10 .* num_examples=11"):
        stream(3, n=11).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        stream(3, seed=5).load_state_dict(state)


def test_micro_batch_times_accumulation_sees_same_rows():
    big, small = stream(8), stream(2)
    for _ in range(5):  # optimizer steps
        assert take(big, 1)[0] == sum(take(small, 4), [])


def test_two_ranks_cover_the_one_rank_step():
    # N = 16 = two steps of 8, so no step straddles a pass and every step holds distinct rows.
    one = stream(8, n=16)
    r0, r1 = stream(4, rank=0, world=2, n=16), stream(4, rank=1, world=2, n=16)
    for _ in range(6):
        a, b = take(r0, 1)[0], take(r1, 1)[0]
        assert not set(a) & set(b)  # disjoint shards
        assert sorted(a + b) == sorted(take(one, 1)[0])  # union = the 1-rank step's rows


def test_two_ranks_two_accumulation_steps():
    one = stream(8)
    r0, r1 = stream(2, rank=0, world=2), stream(2, rank=1, world=2)
    for _ in range(4):
        rows = sum(take(r0, 2), []) + sum(take(r1, 2), [])
        assert Counter(rows) == Counter(take(one, 1)[0])


def test_wraps_without_exhaustion_and_reshuffles():
    s = stream(5)
    batches = take(s, 20)  # 10 passes
    assert s.epoch == pytest.approx(10.0)
    passes = [sum(batches[2 * i: 2 * i + 2], []) for i in range(10)]
    for p in passes:
        assert sorted(p) == list(range(N))  # every row exactly once per pass
    assert len({tuple(p) for p in passes}) > 1  # reshuffled


def test_micro_batch_straddles_pass_boundary():
    s = stream(4)
    flat = sum(take(s, 5), [])  # 20 positions = 2 passes, batch 3 spans both
    assert sorted(flat[:10]) == list(range(N)) and sorted(flat[10:]) == list(range(N))
    assert s.epoch == pytest.approx(2.0)


def test_eval_batches_shard_every_example_once():
    examples = list(range(11))
    full = [b["row_ids"].tolist() for b in eval_batches(examples, 4, ids_collate)]
    assert full == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    r0 = [b["row_ids"].tolist() for b in eval_batches(examples, 2, ids_collate, rank=0, world_size=2)]
    r1 = [b["row_ids"].tolist() for b in eval_batches(examples, 2, ids_collate, rank=1, world_size=2)]
    assert r0 == [[0, 2], [4, 6], [8, 10]]
    assert r1 == [[1, 3], [5, 7], [9]]
    assert sorted(sum(r0 + r1, [])) == examples


def test_prefetch_gives_the_same_batches_and_state():
    """Collating ahead in a thread changes neither the batches nor the resume state; a bad row's
    error surfaces at the micro-batch that holds it."""
    def make(prefetch: int) -> ExampleStream:
        return ExampleStream(list(range(N)), 3, ids_collate, 1, prefetch=prefetch)

    plain, ahead = make(0), make(2)
    assert take(ahead, 9) == take(plain, 9)
    assert ahead.state_dict() == plain.state_dict()
    resumed = make(1)
    resumed.next()  # prefetches micro-batch 1, then jumps: the stale one must not be served
    resumed.load_state_dict(ahead.state_dict())
    assert take(resumed, 5) == take(plain, 5)

    def failing(examples):
        if 7 in examples:
            raise ValueError("row 7 is bad")
        return ids_collate(examples)

    s = ExampleStream(list(range(N)), 2, failing, 1, shuffle=False, prefetch=1)
    assert take(s, 3) == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="row 7"):
        s.next()
    with pytest.raises(ValueError, match="prefetch"):
        ExampleStream([1], 1, ids_collate, 0, prefetch=-1)

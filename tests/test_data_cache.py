"""The tokenization cache: reused when nothing that matters changed, rebuilt (never read) when stale,
atomic when a build dies, built by one process while the others wait."""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import time

import pytest

from bipost.config import DataConfig
from bipost.data import as_tuples, default_cache_dir, load_objective_data, sources
from bipost.data import build as build_mod
from bipost.data.cache import file_digest


def io_rows(n: int, tag: str = "") -> list[dict]:
    return [{"input": f"hello {i}{tag}", "output": f"the answer is {i}"} for i in range(n)]


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load(path, cache, tok, kind="sft", **kw):
    return load_objective_data(DataConfig(path=str(path), cache_dir=str(cache), **kw), kind, tok)


def test_built_then_cached_whatever_the_split_seed_or_workers(tmp_path, tiny_tokenizer, caplog):
    path = write(tmp_path / "train.jsonl", io_rows(30))
    cache = tmp_path / "cache"
    first = load(path, cache, tiny_tokenizer, eval_fraction=0.2)
    assert first.summary.cache == "built" and "tokens built" in str(first.summary)
    with caplog.at_level("INFO", logger="bipost"):
        again = load(path, cache, tiny_tokenizer, eval_fraction=0.2)
    assert again.summary.cache == "cached" and "tokens cached" in caplog.text
    assert "auto-detected as 'input_output'" in caplog.text  # said on every load, built or not
    assert [as_tuples(e) for e in again.train] == [as_tuples(e) for e in first.train]
    # The hold-out, the seed and the worker count choose among the store's rows: no rebuild.
    other = load(path, cache, tiny_tokenizer, eval_fraction=0.5, seed=3, max_eval_samples=2, num_proc=2)
    assert other.summary.cache == "cached" and len(other.eval) == 2
    # The same bytes under another name are the same data.
    copy_path = write(tmp_path / "elsewhere.jsonl", io_rows(30))
    assert load(copy_path, cache, tiny_tokenizer).summary.cache == "cached"
    assert len(list(cache.glob("*/COMPLETE"))) == 1


@pytest.mark.parametrize("change", ["content", "max_len", "template", "keys", "tokenizer", "chat_template",
                                    "max_samples", "encoder"])
def test_anything_that_changes_the_tokens_rebuilds(tmp_path, tiny_tokenizer, change):
    path = tmp_path / "train.jsonl"
    write(path, io_rows(12))
    cache = tmp_path / "cache"
    assert load(path, cache, tiny_tokenizer).summary.cache == "built"
    tok, kind, kw = tiny_tokenizer, "sft", {}
    if change == "content":
        time.sleep(0.01)
        write(path, io_rows(12, tag="!"))
    elif change == "max_len":
        kw = {"max_len": 20}
    elif change == "template":
        kw = {"input_template": "Q: {}\nA: "}
    elif change == "keys":
        write(tmp_path / "renamed.jsonl", [{"q": r["input"], "output": r["output"]} for r in io_rows(12)])
        path, kw = tmp_path / "renamed.jsonl", {"input_key": "q"}
    elif change == "tokenizer":
        tok = copy.deepcopy(tiny_tokenizer)
        tok.add_tokens(["answer"])
    elif change == "chat_template":
        tok = copy.deepcopy(tiny_tokenizer)
        tok.chat_template = tok.chat_template + " "
    elif change == "max_samples":
        kw = {"max_samples": 5}
    else:  # an example type of another kind, with its own encoder
        import dataclasses

        from bipost.data.examples import SFT
        from bipost.data.tokenize import encode_sft_rows

        def encode_upper(items, policy, max_len):
            return encode_sft_rows([(r, p.upper(), a) for r, p, a in items], policy, max_len)

        kind = dataclasses.replace(SFT, name="shouting", encode=encode_upper)
    data = load(path, cache, tok, kind, **kw)
    assert data.summary.cache == "built"
    assert len(list(cache.glob("*/COMPLETE"))) == 2  # the old store is left alone, never read


def test_a_build_that_dies_is_never_read(tmp_path, tiny_tokenizer, monkeypatch):
    path = write(tmp_path / "train.jsonl", io_rows(20))
    cache = tmp_path / "cache"
    real_close = build_mod.StoreWriter.close

    def dies(self, meta, arrays=None):
        raise KeyboardInterrupt  # e.g. Ctrl-C between the last chunk and the manifest

    monkeypatch.setattr(build_mod.StoreWriter, "close", dies)
    with pytest.raises(KeyboardInterrupt):
        load(path, cache, tiny_tokenizer)
    assert not [p for p in cache.iterdir() if p.is_dir() and p.name != "files"]  # neither store nor temp folder
    monkeypatch.setattr(build_mod.StoreWriter, "close", real_close)

    # A builder killed outright (no cleanup) leaves its temporary folder: the next build removes it.
    def killed():
        monkeypatch.setattr(build_mod.StoreWriter, "close", lambda self, meta, arrays=None: os._exit(9))
        load(path, cache, tiny_tokenizer)

    child = multiprocessing.get_context("fork").Process(target=killed)
    child.start()
    child.join()
    assert child.exitcode == 9 and len(list(cache.glob(".tmp-*"))) == 1
    data = load(path, cache, tiny_tokenizer)
    assert data.summary.cache == "built" and not list(cache.glob(".tmp-*"))

    # A store folder without its COMPLETE marker (e.g. copied halfway) is rebuilt, not read.
    (data.train.store.path / "COMPLETE").unlink()
    assert load(path, cache, tiny_tokenizer).summary.cache == "built"


def _load_in_child(path, cache, queue):
    # Every process tokenizes slowly here, so that all of them arrive while the first builds.
    import bipost.data.load as load_mod

    real = load_mod.build_store

    def slow(*args, **kwargs):
        time.sleep(0.5)
        with open(os.path.join(cache, "builds.log"), "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(*args, **kwargs)

    load_mod.build_store = slow  # in this child process only
    data = load_objective_data(DataConfig(path=path, cache_dir=cache), "sft", _TOK)
    queue.put((data.summary.cache, len(data.train)))


_TOK = None


def test_concurrent_processes_tokenize_once(tmp_path, tiny_tokenizer):
    """Three processes (three ranks of a node, or three runs of a sweep) start on an empty cache:
    one builds, the others wait for its lock and map the finished store."""
    global _TOK
    _TOK = tiny_tokenizer
    path = write(tmp_path / "train.jsonl", io_rows(40))
    cache = tmp_path / "cache"
    cache.mkdir()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_load_in_child, args=(path, str(cache), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join()
    assert results == [("built", 40), ("cached", 40), ("cached", 40)]
    assert len((cache / "builds.log").read_text().split()) == 1


def test_max_samples_stops_reading_early(tmp_path, tiny_tokenizer, monkeypatch):
    """Rows past the cap are counted (the summary and the selector report the split's size) but not
    parsed: a corrupted tail beyond the cap's chunk does not matter."""
    monkeypatch.setattr(sources, "CHUNK_BYTES", 200)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in io_rows(10)) + "{not json\n" * 5)
    data = load(path, tmp_path / "cache", tiny_tokenizer, max_samples=4)
    assert (data.summary.rows_read, data.summary.rows_used, len(data.train)) == (15, 4, 4)
    assert "read 15 rows (first 4 used, max_samples)" in str(data.summary)


def test_file_digest_is_remembered_by_stamps(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text("abc\n")
    old = time.time() - 60
    os.utime(path, (old, old))
    memo = tmp_path / "memo"
    real = file_digest(path, memo)
    (entry,) = memo.iterdir()
    saved = json.loads(entry.read_text())
    entry.write_text(json.dumps({**saved, "digest": "remembered"}))
    assert file_digest(path, memo) == "remembered"  # same stamps: the file is not read again
    path.write_text("abd\n")  # same size, new bytes: new mtime/ctime
    assert file_digest(path, memo) not in ("remembered", real)
    fresh = tmp_path / "g.jsonl"
    fresh.write_text("x\n")
    file_digest(fresh, memo)
    assert len(list(memo.iterdir())) == 1  # files modified in the last 2 s are hashed, not remembered


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("BIPOST_CACHE", str(tmp_path / "root"))
    assert default_cache_dir() == tmp_path / "root" / "data"
    monkeypatch.delenv("BIPOST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "bipost" / "data"

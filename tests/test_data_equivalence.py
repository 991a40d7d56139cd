"""The token store path gives exactly the examples of the in-memory path it replaced, on every format.

``reference_load`` is the previous ``load_objective_data``, kept verbatim here: every row in a
Python list (``load_split``), ``max_samples``, the hold-out, ``format_row`` and the batch encoders,
examples as tuples. ``load_objective_data`` must return the same examples (ids, boundaries, row
ids, order), the same eval rows and the same summary (skips by reason, truncations), built in
one process or in two worker processes over many small chunks, and raise the same errors.
"""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bipost.config import DataConfig
from bipost.data import DataError, LoadSummary, PrefText, as_tuples, load_objective_data, load_split
from bipost.data import sources
from bipost.data.formats import format_row, resolve_format
from bipost.data.tokenize import TokenPolicy, encode_pref_batch, encode_sft_batch


# ------------------------------------------------------------------ the previous implementation
def _hold_out(rows, cfg):
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise ValueError(f"data.eval_fraction must be in [0, 1), got {cfg.eval_fraction}")
    n_eval = round(cfg.eval_fraction * len(rows))
    if n_eval == 0:
        return rows, []
    if n_eval >= len(rows):
        raise DataError(f"data '{cfg.path}': eval_fraction={cfg.eval_fraction} of {len(rows)} rows leaves none to train on")
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    held = perm[:n_eval]
    if cfg.max_eval_samples is not None:
        held = held[: cfg.max_eval_samples]
    return [rows[i] for i in sorted(perm[n_eval:])], [rows[i] for i in sorted(held)]


EXAMPLES = {"sft": "sft", "kd": "sft", "dpo": "pref"}
"""The example type each objective kind trains on."""


def _examples(rows, fmt, cfg, kind, policy, skipped, counts):
    items = []
    for row in rows:
        text = format_row(row, fmt, cfg, policy.tokenizer)
        if isinstance(text, str):
            skipped[text] += 1
        elif isinstance(text, PrefText):
            items.append((row.row_id, text.prompt, text.chosen, text.rejected))
        else:
            items.append((row.row_id, text.prompt, text.response))
    encode = encode_pref_batch if kind == "dpo" else encode_sft_batch
    out = []
    for result in encode(items, policy, cfg.max_len, counts):
        if isinstance(result, str):
            skipped[result] += 1
        else:
            out.append(result)
    return out


def reference_load(cfg: DataConfig, kind: str, tokenizer):
    policy = TokenPolicy.of(tokenizer)
    summary = LoadSummary(path=cfg.path, split=cfg.split, kind=kind, max_len=cfg.max_len)
    rows = load_split(cfg.path, cfg.split)
    summary.rows_read = len(rows)
    if cfg.max_samples is not None:
        rows = rows[: cfg.max_samples]
    summary.rows_used = len(rows)
    if not rows:
        raise DataError(f"data '{cfg.path}': split '{cfg.split}' has no rows")
    if cfg.eval_split:
        train_rows = rows
        eval_rows = load_split(cfg.path, cfg.eval_split)
        if cfg.max_eval_samples is not None:
            eval_rows = eval_rows[: cfg.max_eval_samples]
        summary.eval_from = f"split '{cfg.eval_split}'"
    else:
        train_rows, eval_rows = _hold_out(rows, cfg)
        if eval_rows:
            summary.eval_from = f"held out {cfg.eval_fraction:g} of the rows"
    summary.eval_rows = len(eval_rows)
    summary.format = fmt = resolve_format(cfg, rows[0], EXAMPLES[kind], who=f"objective '{kind}'")
    counts: Counter = Counter()
    train = _examples(train_rows, fmt, cfg, kind, policy, summary.skipped, counts)
    summary.truncated = counts["truncated"]
    evals = _examples(eval_rows, fmt, cfg, kind, policy, summary.eval_skipped, Counter())
    summary.train_kept, summary.eval_kept = len(train), len(evals)
    return train, evals, summary


# ------------------------------------------------------------------ the comparison
@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few rows, so that two workers see many chunks even in a small file."""
    monkeypatch.setattr(sources, "CHUNK_BYTES", 300)
    monkeypatch.setattr(sources, "CHUNK_ROWS", 3)


def check_same(cfg: DataConfig, kind: str, tok, tmp_path, tag: str = "") -> None:
    want_train, want_eval, want = reference_load(cfg, kind, tok)
    assert want.train_kept > 3  # the case is not vacuous
    for num_proc in (1, 2):
        cfg.cache_dir, cfg.num_proc = str(tmp_path / f"cache{tag}-{num_proc}"), num_proc
        got = load_objective_data(cfg, EXAMPLES[kind], tok, objective=kind)
        assert got.summary.cache == "built" and got.train.store.meta["num_proc"] == num_proc
        assert [as_tuples(e) for e in got.train] == want_train
        assert [as_tuples(e) for e in got.eval] == want_eval
        assert got.train.row_ids.tolist() == [e.row_id for e in want_train]
        got.summary.cache = got.summary.store = ""
        assert got.summary == want and str(got.summary) == str(want)


def io_rows(n: int) -> list[dict]:
    rows = [{"input": f"hello {i}", "output": f"the answer is {i} " + "yes " * (i % 7)} for i in range(n)]
    rows[2]["output"] = ""
    rows[5]["output"] = None
    rows[7]["output"] = 3
    rows[11]["input"] = "hello world " * 30  # too long for max_len
    return rows


def write_lines(path, rows, blank_every: int = 0) -> str:
    lines = []
    for i, r in enumerate(rows):
        lines.append(json.dumps(r))
        if blank_every and i % blank_every == 0:
            lines.append("  ")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_jsonl_input_output_with_skips_caps_and_hold_out(tmp_path, tiny_tokenizer, small_chunks):
    path = write_lines(tmp_path / "train.jsonl", io_rows(40), blank_every=6)
    cfg = DataConfig(path=path, max_len=28, max_samples=33, eval_fraction=0.25, max_eval_samples=5, seed=4)
    check_same(cfg, "sft", tiny_tokenizer, tmp_path)
    check_same(DataConfig(path=path, max_len=28), "kd", tiny_tokenizer, tmp_path, "all")


def test_jsonl_prompt_completion_and_messages(tmp_path, tiny_tokenizer, small_chunks):
    rows = []
    for i in range(24):
        if i % 3 == 0:
            rows.append({"prompt": f"say {i}", "completion": f" ok {i}"})
        elif i % 3 == 1:
            rows.append({"prompt": [{"role": "user", "content": f"hi {i}"}],
                         "completion": [{"role": "assistant", "content": f"yo {i}"}]})
        else:
            rows.append({"prompt": f"say {i}", "completion": [{"role": "assistant", "content": "x"}]})  # mixed: skip
    check_same(DataConfig(path=write_lines(tmp_path / "pc.jsonl", rows), eval_fraction=0.2), "sft",
               tiny_tokenizer, tmp_path, "pc")
    msgs = [{"messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"a {i}"}]}
            for i in range(20)]
    msgs[3]["messages"] = msgs[3]["messages"][:1]  # last turn not the assistant's: skip
    msgs[4]["messages"] = [{"role": "user"}]  # malformed: skip
    check_same(DataConfig(path=write_lines(tmp_path / "m.jsonl", msgs)), "sft", tiny_tokenizer, tmp_path, "m")


def test_preference_every_layout(tmp_path, tiny_tokenizer, small_chunks):
    rows = []
    for i in range(30):
        k = i % 5
        if k == 0:
            rows.append({"prompt": f"q {i}", "chosen": f" good {i}", "rejected": " bad"})
        elif k == 1:  # HH implicit prompt
            rows.append({"chosen": f"\n\nHuman: what {i}?\n\nAssistant: the answer is {i}",
                         "rejected": f"\n\nHuman: what {i}?\n\nAssistant: no"})
        elif k == 2:  # TRL explicit conversational prompt
            rows.append({"prompt": [{"role": "user", "content": f"hi {i}"}],
                         "chosen": [{"role": "assistant", "content": "hello"}],
                         "rejected": [{"role": "assistant", "content": "go"}]})
        elif k == 3:  # whole conversations sharing the prompt turns
            turn = {"role": "user", "content": f"hey {i}"}
            rows.append({"chosen": [turn, {"role": "assistant", "content": "yes"}],
                         "rejected": [turn, {"role": "assistant", "content": "no"}]})
        else:
            rows.append({"prompt": f"q {i}", "chosen": " same", "rejected": " same"})  # identical: skip
    path = write_lines(tmp_path / "pref.jsonl", rows)
    check_same(DataConfig(path=path, eval_fraction=0.2, seed=1, max_len=20), "dpo", tiny_tokenizer, tmp_path)


@pytest.mark.parametrize("layout", ["array", "columns", "lines"])
def test_json_files(tmp_path, tiny_tokenizer, small_chunks, layout):
    rows = io_rows(20)
    path = tmp_path / "data.json"
    if layout == "array":
        path.write_text(json.dumps(rows, indent=1))
    elif layout == "columns":
        path.write_text(json.dumps({k: [r[k] for r in rows] for k in rows[0]}))
    else:
        write_lines(path, rows)
    check_same(DataConfig(path=str(path), max_len=28, eval_fraction=0.1), "sft", tiny_tokenizer, tmp_path)


def test_parquet_csv_and_folder_with_eval_split(tmp_path, tiny_tokenizer, small_chunks):
    rows = [{"input": f"q{i}", "output": f"a{i} and more"} for i in range(30)]
    rows[4]["output"] = ""
    folder = tmp_path / "ds"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:12]), folder / "train-0.parquet", row_group_size=5)
    with open(folder / "train-1.csv", "w") as f:
        f.write("input,output\n" + "".join(f'"{r["input"]}","{r["output"]}"\n' for r in rows[12:22]))
    write_lines(folder / "train-2.jsonl", rows[22:])
    write_lines(folder / "test.jsonl", rows[:9])
    check_same(DataConfig(path=str(folder), max_samples=27), "sft", tiny_tokenizer, tmp_path, "split")
    check_same(DataConfig(path=str(folder), eval_split="test", max_eval_samples=7), "sft", tiny_tokenizer, tmp_path)


def test_hub_dataset(tmp_path, tiny_tokenizer, small_chunks, monkeypatch):
    import datasets

    rows = io_rows(25)
    rows[7]["output"] = None  # an Arrow column holds one type
    ds = datasets.Dataset.from_list(rows)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: ds)
    check_same(DataConfig(path="someone/data", max_len=28, eval_fraction=0.2), "sft", tiny_tokenizer, tmp_path)


# ------------------------------------------------------------------ errors
def same_error(cfg: DataConfig, kind: str, tok, tmp_path) -> str:
    with pytest.raises(DataError) as want:
        reference_load(cfg, kind, tok)
    for num_proc in (1, 2):
        cfg.cache_dir, cfg.num_proc = str(tmp_path / f"cache-{num_proc}"), num_proc
        with pytest.raises(DataError) as got:
            load_objective_data(cfg, EXAMPLES[kind], tok, objective=kind)
        assert str(got.value) == str(want.value)
        cache = tmp_path / f"cache-{num_proc}"
        assert not list(cache.glob("*/COMPLETE")) and not list(cache.glob(".tmp-*"))  # nothing kept
    return str(want.value)


def test_errors_name_the_true_file_row_and_line(tmp_path, tiny_tokenizer, small_chunks):
    rows = io_rows(30)
    del rows[23]["output"]  # deep in a later chunk
    path = write_lines(tmp_path / "train.jsonl", rows, blank_every=4)
    msg = same_error(DataConfig(path=path), "sft", tiny_tokenizer, tmp_path / "a")
    assert "row 23 (line 30): missing key 'output'" in msg
    text = (tmp_path / "train.jsonl").read_text().splitlines()
    text[27] = '{"input": "x", "output": '
    (tmp_path / "bad.jsonl").write_text("\n".join(text) + "\n")
    msg = same_error(DataConfig(path=str(tmp_path / "bad.jsonl")), "sft", tiny_tokenizer, tmp_path / "b")
    assert "line 28 (row 21): invalid JSON" in msg
    folder = tmp_path / "pq"
    folder.mkdir()
    good = [{"input": f"q{i}", "output": f"a{i}"} for i in range(10)]
    pq.write_table(pa.Table.from_pylist(good), folder / "train-0.parquet", row_group_size=4)
    pq.write_table(pa.Table.from_pylist([{"input": "q"}] * 5), folder / "train-1.parquet")  # no 'output' column
    msg = same_error(DataConfig(path=str(folder)), "sft", tiny_tokenizer, tmp_path / "c")
    assert msg.endswith("train-1.parquet', row 0: missing key 'output' (the row has keys ['input'])")


def test_error_past_max_samples_is_not_raised(tmp_path, tiny_tokenizer, small_chunks):
    """A row the cap leaves out is never formatted (as before), even when a worker saw it."""
    rows = io_rows(30)
    del rows[20]["output"]
    path = write_lines(tmp_path / "train.jsonl", rows)
    check_same(DataConfig(path=path, max_samples=19, max_len=28), "sft", tiny_tokenizer, tmp_path)

"""load_objective_data end to end: caps, eval hold-out, row ids, skip accounting, summary."""

from __future__ import annotations

import json

import pytest

from bipost.config import DataConfig
from bipost.data import DataError, PrefExample, SFTExample, load_objective_data


def io_rows(n: int) -> list[dict]:
    return [{"input": f"hello {i}", "output": f"the answer is {i}"} for i in range(n)]


def test_sft_input_output(write_jsonl, tiny_tokenizer, caplog):
    path = write_jsonl(io_rows(6))
    with caplog.at_level("INFO", logger="bipost"):
        data = load_objective_data(DataConfig(path=str(path)), "sft", tiny_tokenizer)
    assert [e.row_id for e in data.train] == list(range(6))
    assert all(isinstance(e, SFTExample) for e in data.train)
    assert len(data.eval) == 0
    s = data.summary
    assert (s.format, s.rows_read, s.train_kept, s.eval_kept) == ("input_output", 6, 6, 0)
    assert str(s) in caplog.text
    assert "auto-detected as 'input_output'" in caplog.text
    batch = data.collate(data.train[:2])
    assert batch["input_ids"].shape[0] == 2


def test_row_ids_survive_skips_cap_and_hold_out(write_jsonl, tiny_tokenizer):
    rows = io_rows(20)
    rows[2]["output"] = ""  # skipped: empty
    rows[5]["output"] = None  # skipped: null
    rows[7]["output"] = 3  # skipped: non-string
    path = write_jsonl(rows)
    cfg = DataConfig(path=str(path), max_samples=16, eval_fraction=0.25, seed=3)
    data = load_objective_data(cfg, "sft", tiny_tokenizer)
    train_ids = [e.row_id for e in data.train]
    eval_ids = [e.row_id for e in data.eval]
    assert not set(train_ids) & set(eval_ids)
    assert set(train_ids) | set(eval_ids) == set(range(16)) - {2, 5, 7}
    assert train_ids == sorted(train_ids) and eval_ids == sorted(eval_ids)
    for e in [*data.train, *data.eval]:  # each example still carries its own row's text
        expected = f"the answer is {e.row_id}"
        assert tiny_tokenizer.decode(e.response_ids[:-1]) == expected
    s = data.summary
    assert s.rows_read == 20 and s.rows_used == 16 and s.eval_rows == 4
    total_skips = sum(s.skipped.values()) + sum(s.eval_skipped.values())
    assert total_skips == 3
    assert (s.skipped + s.eval_skipped) == {"empty 'output'": 1, "null 'output'": 1, "non-string 'output'": 1}
    text = str(s)
    assert "read 20 rows" in text and "first 16 used" in text
    for reason in ("empty 'output'", "null 'output'", "non-string 'output'"):
        assert f"{reason}: 1" in text


def test_hold_out_is_deterministic_and_seeded(write_jsonl, tiny_tokenizer):
    path = write_jsonl(io_rows(40))

    def eval_ids(seed: int, max_eval=None) -> list[int]:
        cfg = DataConfig(path=str(path), eval_fraction=0.2, seed=seed, max_eval_samples=max_eval)
        return [e.row_id for e in load_objective_data(cfg, "sft", tiny_tokenizer).eval]

    assert eval_ids(0) == eval_ids(0)
    assert len(eval_ids(0)) == 8
    assert eval_ids(0) != eval_ids(1)
    capped = eval_ids(0, max_eval=3)
    assert len(capped) == 3 and set(capped) <= set(eval_ids(0))
    # The cap does not return held-out rows to training.
    cfg = DataConfig(path=str(path), eval_fraction=0.2, seed=0, max_eval_samples=3)
    train = {e.row_id for e in load_objective_data(cfg, "sft", tiny_tokenizer).train}
    assert train == set(range(40)) - set(eval_ids(0))


def test_eval_split_from_folder(tmp_path, tiny_tokenizer):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in io_rows(5)))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in io_rows(4)))
    cfg = DataConfig(path=str(tmp_path), eval_split="test", max_eval_samples=3)
    data = load_objective_data(cfg, "sft", tiny_tokenizer)
    assert len(data.train) == 5 and [e.row_id for e in data.eval] == [0, 1, 2]
    assert "3 eval rows from split 'test'" in str(data.summary)


def test_too_long_rows_are_counted(write_jsonl, tiny_tokenizer):
    rows = io_rows(4)
    rows[1]["input"] = "hello world " * 40
    data = load_objective_data(DataConfig(path=str(write_jsonl(rows)), max_len=24), "sft", tiny_tokenizer)
    assert [e.row_id for e in data.train] == [0, 2, 3]
    assert data.summary.skipped == {"too long": 1}
    assert "too long: 1" in str(data.summary)
    assert all(len(e) <= 24 for e in data.train)


def test_missing_key_is_an_error_naming_key_file_and_row(write_jsonl, tiny_tokenizer):
    rows = io_rows(4)
    del rows[2]["output"]
    path = write_jsonl(rows)
    with pytest.raises(DataError, match=rf"file '{path}', row 2 \(line 3\): missing key 'output'"):
        load_objective_data(DataConfig(path=str(path)), "sft", tiny_tokenizer)


def test_all_rows_skipped_explains_why(write_jsonl, tiny_tokenizer):
    rows = [{"input": "a", "output": ""} for _ in range(3)] + [{"input": "a", "output": None}]
    with pytest.raises(DataError, match=r"all 4 training rows were skipped; top reasons: empty 'output' \(3\), null 'output' \(1\)"):
        load_objective_data(DataConfig(path=str(write_jsonl(rows))), "sft", tiny_tokenizer)


def test_dpo_hh_style(write_jsonl, tiny_tokenizer):
    rows = [
        {"chosen": f"\n\nHuman: what {i}?\n\nAssistant: the answer is {i}",
         "rejected": f"\n\nHuman: what {i}?\n\nAssistant: no"}
        for i in range(5)
    ]
    data = load_objective_data(DataConfig(path=str(write_jsonl(rows))), "pref", tiny_tokenizer)
    assert data.summary.format == "preference"
    assert all(isinstance(e, PrefExample) for e in data.train)
    e = data.train[0]
    assert tiny_tokenizer.decode(e.prompt_ids, skip_special_tokens=True) == "\n\nHuman: what 0?\n\nAssistant:"
    assert tiny_tokenizer.decode(e.chosen_ids, skip_special_tokens=True) == " the answer is 0"
    batch = data.collate(data.train)
    assert batch["input_ids"].shape[0] == 10 and batch["row_ids"].tolist() == list(range(5))


def test_messages_with_chat_template(write_jsonl, tiny_tokenizer):
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
            for i in range(3)]
    data = load_objective_data(DataConfig(path=str(write_jsonl(rows))), "sft", tiny_tokenizer)
    e = data.train[0]
    eos, bos = tiny_tokenizer.eos_token_id, tiny_tokenizer.bos_token_id
    assert list(e.response_ids).count(eos) == 1 and e.response_ids[-1] == eos
    assert e.prompt_ids[0] == bos and list(e.prompt_ids).count(bos) == 1
    assert tiny_tokenizer.decode(e.response_ids) == "hello<eos>"


def test_wrong_kind_for_data(write_jsonl, tiny_tokenizer):
    with pytest.raises(DataError, match="objective 'dpo' needs a preference format"):
        load_objective_data(DataConfig(path=str(write_jsonl(io_rows(2)))), "pref", tiny_tokenizer, objective="dpo")

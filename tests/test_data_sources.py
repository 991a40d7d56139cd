"""Reading rows: file types, folders and splits, row ids, and every unreadable-input error."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bipost.data import DataError, load_split

ROWS = [{"input": f"q{i}", "output": f"a{i}"} for i in range(5)]


def test_jsonl_rows_ids_and_lines(write_jsonl, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS[:2]) + "\n\n" + json.dumps(ROWS[2]) + "\n")
    rows = load_split(path, "train")
    assert [r.data for r in rows] == ROWS[:3]
    assert [r.row_id for r in rows] == [0, 1, 2]
    assert [r.line for r in rows] == [1, 2, 4]  # the blank line is skipped, lines stay true
    assert rows[2].source == str(path) and rows[2].index == 2


def test_missing_key_differs_from_null(write_jsonl):
    rows = load_split(write_jsonl([{"input": "a"}, {"input": "a", "output": None}]))
    assert "output" not in rows[0].data
    assert rows[1].data["output"] is None


@pytest.mark.parametrize("layout", ["array", "columns", "columns_one_line", "lines"])
def test_json_layouts(tmp_path, layout):
    path = tmp_path / "data.json"
    if layout == "array":
        path.write_text(json.dumps(ROWS, indent=2))
    elif layout == "columns":
        path.write_text(json.dumps({k: [r[k] for r in ROWS] for k in ROWS[0]}, indent=2))
    elif layout == "columns_one_line":
        path.write_text(json.dumps({k: [r[k] for r in ROWS] for k in ROWS[0]}))
    else:
        path.write_text("\n".join(json.dumps(r) for r in ROWS))
    assert [r.data for r in load_split(path)] == ROWS


def test_json_single_conversation_row_is_not_columns(tmp_path):
    path = tmp_path / "one.json"
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path.write_text(json.dumps(row))
    assert [r.data for r in load_split(path)] == [row]


def test_parquet_and_csv(tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "x.parquet")
    assert [r.data for r in load_split(tmp_path / "x.parquet")] == ROWS
    csv = tmp_path / "x.csv"
    csv.write_text('input,output\n"a, b",1\n,"multi\nline"\n')
    rows = load_split(csv)
    # Cells stay strings (no number inference); an empty cell is "" (reported as empty later).
    assert [r.data for r in rows] == [{"input": "a, b", "output": "1"}, {"input": "", "output": "multi\nline"}]


def test_folder_splits_and_global_row_ids(tmp_path):
    d = tmp_path / "ds"
    (d / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ROWS[:2]), d / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[2:4]), d / "data" / "train-00001-of-00002.parquet")
    (d / "data" / "test.jsonl").write_text(json.dumps(ROWS[4]) + "\n")
    train = load_split(d, "train")
    assert [r.data for r in train] == ROWS[:4]
    assert [r.row_id for r in train] == [0, 1, 2, 3]  # ids run across files
    assert [r.index for r in train] == [0, 1, 0, 1]  # indices within each file
    assert [r.data for r in load_split(d, "test")] == [ROWS[4]]


def test_folder_without_split_names_is_train_but_not_test(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps(ROWS[1]) + "\n")
    (tmp_path / "test.jsonl").write_text(json.dumps(ROWS[2]) + "\n")
    assert [r.data for r in load_split(tmp_path, "train")] == ROWS[:2]


def test_unknown_split_lists_available(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    (tmp_path / "validation.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(DataError, match=r"split 'test'.*available splits: \['train', 'validation'\]"):
        load_split(tmp_path, "test")
    with pytest.raises(DataError, match=r"only has the 'train' split"):
        load_split(tmp_path / "train.jsonl", "test")


def test_corrupted_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"input": "x", "output": \n' + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl', line 2 \(row 1\): invalid JSON") as e:
        load_split(path)
    assert isinstance(e.value.__cause__, json.JSONDecodeError)


def test_jsonl_non_object_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('[1, 2]\n')
    with pytest.raises(DataError, match=r"line 1 .*expected a JSON object"):
        load_split(path)


def test_corrupted_parquet_is_a_clear_error(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(DataError, match=r"train\.parquet' is not a readable parquet file") as e:
        load_split(path)
    assert e.value.__cause__ is not None


def test_bad_csv_is_a_clear_error(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("input,output\na,b,c\n")
    with pytest.raises(DataError, match=r"train\.csv' is not a readable CSV file"):
        load_split(path)


def test_nonexistent_path(tmp_path):
    with pytest.raises(DataError, match="neither a local path .* nor a reachable Hugging Face hub dataset"):
        load_split(tmp_path / "missing.jsonl")


def test_unreachable_hub_name():
    # conftest sets HF_HUB_OFFLINE, so this fails fast without network access.
    with pytest.raises(DataError, match="neither a local path .* nor a reachable Hugging Face hub dataset"):
        load_split("no-such-owner-xyz/no-such-dataset-xyz", "train")


def test_hub_dataset_rows_and_unknown_split(monkeypatch):
    import datasets

    def fake_load_dataset(name, split):
        if split != "train":
            raise ValueError(f'Unknown split "{split}". Should be one of [\'train\', \'test\'].')
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = load_split("someone/some-data", "train")
    assert [r.data for r in rows] == ROWS and [r.row_id for r in rows] == list(range(5))
    assert rows[0].source == "hf:someone/some-data[train]"
    with pytest.raises(DataError, match=r"split 'nope' does not exist.*\['train', 'test'\]"):
        load_split("someone/some-data", "nope")

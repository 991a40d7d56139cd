"""Per-row loss weights (data.weight_key, data.weights_file; bipost/data/weights.py) through the loop.

The reduction contract with weights: a step's loss is ``sum_i w_i losses_i / sum_i w_i units_i``
over every example of the step. Hence (each derived in its test): weight 1 everywhere is bit for bit
no weighting; weight 2 on a row is that row twice in the same step; weight 0 is the row absent;
scaling every weight by one factor changes nothing, even where the weighted units sum below 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bipost.config import DataConfig
from bipost.configio import ConfigError
from bipost.data import DataError, load_objective_data
from bipost.run import build_trainer
from bipost.selector.outputs import write_weights

from helpers import config, workspace

SOURCES = {"sft": "sft.jsonl", "dpo": "pref.jsonl"}


def rows_of(kind: str, n: int | None = None) -> list[dict]:
    lines = (workspace() / SOURCES[kind]).read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def losses(result, name: str) -> list[float]:
    return [r[name] for r in result.train_losses]


def run(out: Path, kind: str, data: Path, *overrides: str, steps: int = 3):
    trainer = build_trainer(config(out, f"train.max_steps={steps}", f"objectives.0.data.path={data}",
                                   *overrides, kinds=(kind,)))
    return trainer, trainer.train()


@pytest.mark.parametrize("kind,packing", [("sft", "false"), ("dpo", "true")])
def test_weight_one_everywhere_is_no_weighting(tmp_path, kind, packing):
    """w_i = 1: ``1.0 * losses`` and ``1.0 * units`` are the same floats, so every step's loss and
    update is bit-identical to the unweighted run's; the batches do carry ``weights``."""
    rows = rows_of(kind)
    plain = write(tmp_path / "plain.jsonl", rows)
    weighted = write(tmp_path / "w.jsonl", [{**r, "w": 1} for r in rows])
    _, a = run(tmp_path / "a", kind, plain, f"train.packing={packing}")
    trainer, b = run(tmp_path / "b", kind, weighted, f"train.packing={packing}", "objectives.0.data.weight_key=w")
    assert losses(b, kind) == losses(a, kind)
    batch = trainer.runs[kind].stream.batch(0)
    assert batch["weights"].tolist() == [1.0] * 8


@pytest.mark.parametrize("kind,packing", [("sft", "false"), ("dpo", "true"), ("sft", "true")])
def test_weight_two_is_the_row_twice(tmp_path, kind, packing):
    """8 rows with w_3 = 2 against 9 rows where row 3 appears twice, one micro-batch = the whole data
    set, so every step holds every row: ``sum_i w_i l_i = sum_{i != 3} l_i + 2 l_3`` and
    ``sum_i w_i u_i = sum_{i != 3} u_i + 2 u_3`` are the duplicated set's sums. Same losses and the
    same updates, up to summation order (rtol 1e-6), for SFT (unit: a token) and DPO (unit: a pair)."""
    rows = rows_of(kind, 8)
    weighted = write(tmp_path / "w.jsonl", [{**r, "w": 2.0 if i == 3 else 1.0} for i, r in enumerate(rows)])
    twice = write(tmp_path / "twice.jsonl", rows + [rows[3]])
    a_args = (f"train.packing={packing}", "objectives.0.data.weight_key=w", "train.batch_size=8",
              "train.micro_batch_size=8")
    b_args = (f"train.packing={packing}", "train.batch_size=9", "train.micro_batch_size=9")
    ga = first_step_gradients(config(tmp_path / "ga", f"objectives.0.data.path={weighted}", *a_args, kinds=(kind,)))
    gb = first_step_gradients(config(tmp_path / "gb", f"objectives.0.data.path={twice}", *b_args, kinds=(kind,)))
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")
    _, a = run(tmp_path / "a", kind, weighted, *a_args)
    _, b = run(tmp_path / "b", kind, twice, *b_args)
    torch.testing.assert_close(torch.tensor(losses(a, kind)), torch.tensor(losses(b, kind)), rtol=1e-6, atol=0)


def first_step_gradients(cfg) -> dict[str, torch.Tensor]:
    """The gradients of the first step's backward, as the loop takes it (before the optimizer)."""
    trainer = build_trainer(cfg)
    plan = trainer.schedule.plan(0, trainer.probe)
    batches = trainer.prepare(0, trainer.draw(plan))
    units = trainer.count_units(batches)
    for name, micro in batches.items():
        for batch in micro:
            trainer.forward_backward(name, batch, 1.0 / units[name], sync=True)
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


def test_weight_zero_is_the_row_absent(tmp_path):
    """Rows of weight 0 leave training when the data is loaded: the stream is the one of the data
    set without them (same examples, same order), so the losses are bit-identical."""
    rows = rows_of("sft")
    zero = {2, 5, 40}
    weighted = write(tmp_path / "w.jsonl", [{**r, "w": 0 if i in zero else 1} for i, r in enumerate(rows)])
    without = write(tmp_path / "without.jsonl", [r for i, r in enumerate(rows) if i not in zero])
    ta, a = run(tmp_path / "a", "sft", weighted, "objectives.0.data.weight_key=w")
    _, b = run(tmp_path / "b", "sft", without)
    assert losses(a, "sft") == losses(b, "sft")
    data = ta.runs["sft"].data
    assert data.summary.zero_weight == 3 and len(data.train) == 61
    assert not set(data.train.row_ids.tolist()) & zero
    assert "3 of weight 0 left out" in str(data.summary)


def test_one_scale_for_every_weight_changes_nothing(tmp_path):
    """DPO, 2 pairs a step of weight 0.25 each: the step's units are 0.5, below 1. The loss
    ``sum 0.25 l_i / sum 0.25`` is the unweighted pair mean exactly (0.25 is a power of 2), so no
    divisor may be clamped to 1 (it would halve the loss)."""
    rows = rows_of("dpo", 16)
    plain = write(tmp_path / "plain.jsonl", rows)
    quarter = write(tmp_path / "q.jsonl", [{**r, "w": 0.25} for r in rows])
    small = ("train.batch_size=2", "train.micro_batch_size=1")
    _, a = run(tmp_path / "a", "dpo", plain, *small)
    _, b = run(tmp_path / "b", "dpo", quarter, *small, "objectives.0.data.weight_key=w")
    assert losses(b, "dpo") == losses(a, "dpo")


def test_selector_weights_file_is_soft_selection(tmp_path):
    """A selector weights file joined on row ids gives the same run, bit for bit, as the same weights
    in a column; the eval rows (held out) are never weighted, so the held-out loss of the weighted
    run equals the unweighted run's on the same model; and the token store is reused (the file is
    applied when the data is loaded)."""
    rows = rows_of("sft")
    plain = write(tmp_path / "plain.jsonl", rows)
    hold = ("objectives.0.data.eval_fraction=0.25",)
    base = build_trainer(config(tmp_path / "base", f"objectives.0.data.path={plain}", *hold))
    train_ids = base.runs["sft"].train.row_ids
    rng = np.random.default_rng(0)
    w = rng.uniform(0.2, 1.8, size=len(train_ids)).round(3)
    write_weights({"row_id": train_ids, "logit": np.zeros(len(w)), "weight": w, "rank": np.arange(1, len(w) + 1)},
                  tmp_path / "selector", ["parquet"], {"data_path": str(plain)})
    by_id = dict(zip(train_ids.tolist(), w.tolist()))
    column = write(tmp_path / "col.jsonl", [{**r, "w": by_id.get(i, 1.0)} for i, r in enumerate(rows)])

    soft = build_trainer(config(tmp_path / "soft", f"objectives.0.data.path={plain}", *hold,
                                f"objectives.0.data.weights_file={tmp_path / 'selector'}"))
    data = soft.runs["sft"].data
    assert data.summary.cache == "cached" and data.summary.store == base.runs["sft"].data.summary.store
    batch = soft.runs["sft"].stream.batch(0)
    assert batch["weights"].tolist() == [by_id[i] for i in batch["row_ids"].tolist()]
    assert soft.evaluate() == base.evaluate()  # held-out rows carry no weights

    col = build_trainer(config(tmp_path / "col", f"objectives.0.data.path={column}", *hold,
                               "objectives.0.data.weight_key=w"))
    assert col.runs["sft"].data.summary.store != base.runs["sft"].data.summary.store  # weights live in the store
    assert losses(soft.train(), "sft") == losses(col.train(), "sft")


def test_selector_output_applies_to_the_next_run(tmp_path):
    """``bipost select train``'s weights.parquet (its run folder) as data.weights_file: the next run's
    batches carry exactly the learned weights of their rows."""
    from bipost.run import train
    from bipost.selector.outputs import read_weights

    ws = workspace()
    args = [f"model.path={ws / 'model'}", f"train.output_dir={tmp_path / 'sel'}", "train.progress=false",
            "train.max_steps=2", "train.batch_size=8", "train.micro_batch_size=8", "optim.lr=1e-3",
            "objectives.0.kind=sft", f"objectives.0.data.path={ws / 'sft.jsonl'}", "objectives.0.data.max_len=64",
            "objectives.1.kind=sft", f"objectives.1.data.path={ws / 'copy.jsonl'}", "objectives.1.data.max_len=64",
            "objectives.1.data.max_samples=16", "schedule.name=bilevel", "selector.enabled=true", "selector.lr=0.5",
            "selector.every_epochs=0"]
    from bipost.configio import load_config

    train(load_config(overrides=args))
    table, _ = read_weights(tmp_path / "sel")
    assert np.ptp(table["weight"]) > 0  # the selector moved
    next_run = build_trainer(config(tmp_path / "next", f"objectives.0.data.path={ws / 'copy.jsonl'}",
                                    "objectives.0.data.max_samples=16",
                                    f"objectives.0.data.weights_file={tmp_path / 'sel'}"))
    batch = next_run.runs["sft"].stream.batch(0)
    learned = dict(zip(table["row_id"].tolist(), table["weight"].tolist()))
    assert batch["weights"].tolist() == [learned[i] for i in batch["row_ids"].tolist()]


def test_data_weights_under_the_selector(tmp_path):
    """The selector's lower objective with data weights 1 everywhere is the run without them, bit for
    bit: rows stay its units (``d_i = 1``) and the selector's own step sees the same row losses."""
    from bipost.configio import load_config
    from bipost.run import train
    from bipost.selector.outputs import read_weights

    ws = workspace()
    rows = [json.loads(x) for x in (ws / "copy.jsonl").read_text().splitlines()]
    ones = write(tmp_path / "ones.jsonl", [{**r, "w": 1.0} for r in rows])

    def args(out, *extra):
        return [f"model.path={ws / 'model'}", f"train.output_dir={out}", "train.progress=false",
                "train.max_steps=3", "train.batch_size=8", "train.micro_batch_size=4", "optim.lr=1e-3",
                "objectives.0.kind=sft", f"objectives.0.data.path={ws / 'sft.jsonl'}", "objectives.0.data.max_len=64",
                "objectives.1.kind=sft", "objectives.1.data.max_len=64", "objectives.1.data.max_samples=16",
                "schedule.name=bilevel", "objectives.0.weight=0.5", "objectives.1.weight=0.5",
                "selector.enabled=true", "selector.lr=0.05", "selector.every_epochs=0", *extra]

    a = train(load_config(overrides=args(tmp_path / "a", f"objectives.1.data.path={ws / 'copy.jsonl'}")))
    b = train(load_config(overrides=args(tmp_path / "b", f"objectives.1.data.path={ones}",
                                         "objectives.1.data.weight_key=w")))
    assert a.train_losses == b.train_losses
    wa, _ = read_weights(tmp_path / "a" / "selector")
    wb, _ = read_weights(tmp_path / "b" / "selector")
    assert wa["logit"].tolist() == wb["logit"].tolist()


# ------------------------------------------------------------------------------------ bad weights

@pytest.mark.parametrize("value,message", [
    ("missing", "missing weight column 'w'"),
    (None, "field 'w': the weight must be a number >= 0, not null"),
    ("2", "field 'w': the weight must be a number >= 0, not str '2'"),
    (True, "field 'w': the weight must be a number >= 0, not bool"),
    (-1, "field 'w': the weight must be a finite number >= 0, not -1"),
    (float("nan"), "field 'w': the weight must be a finite number >= 0, not nan"),
])
def test_bad_weight_is_an_error_naming_file_row_and_field(tmp_path, tiny_tokenizer, value, message):
    rows = [{"input": "a b", "output": "b a", "w": 1} for _ in range(4)]
    if value == "missing":
        del rows[2]["w"]
    else:
        rows[2]["w"] = value
    path = write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_objective_data(DataConfig(path=str(path), weight_key="w", max_len=32), "sft", tiny_tokenizer)
    assert f"file '{path}', row 2 (line 3)" in str(err.value) and message in str(err.value)


def test_csv_weights_are_numeric_cells(tmp_path, tiny_tokenizer):
    """Every CSV cell is text: a number in a cell is a weight, anything else an error."""
    path = tmp_path / "w.csv"
    path.write_text("input,output,w\na b,b a,2.5\nc d,d c,0.5\n")
    data = load_objective_data(DataConfig(path=str(path), weight_key="w", max_len=32), "sft", tiny_tokenizer)
    assert data.weights.tolist() == [2.5, 0.5] and data.summary.cache == "built"
    again = load_objective_data(DataConfig(path=str(path), weight_key="w", max_len=32), "sft", tiny_tokenizer)
    assert again.weights.tolist() == [2.5, 0.5] and again.summary.cache == "cached"  # kept in the store
    path.write_text("input,output,w\na b,b a,2.5\nc d,d c,heavy\n")
    with pytest.raises(DataError, match=r"row 1, field 'w': the weight must be a number >= 0, not str 'heavy'"):
        load_objective_data(DataConfig(path=str(path), weight_key="w", max_len=32), "sft", tiny_tokenizer)


def test_weights_file_errors_and_missing_rows(tmp_path, tiny_tokenizer):
    """A training row the file does not list is an error unless data.missing_weight gives its weight;
    a negative weight in the file is an error naming the file and the row id; all weights 0 is an error."""
    path = write(tmp_path / "d.jsonl", [{"input": f"a {i}", "output": f"{i} a"} for i in range(4)])

    def table(ids, w):
        return {"row_id": np.asarray(ids), "logit": np.zeros(len(ids)), "weight": np.asarray(w, float),
                "rank": np.arange(1, len(ids) + 1)}

    write_weights(table([0, 1, 3], [0.5, 1.5, 2.0]), tmp_path / "sel", ["jsonl"], {})
    cfg = DataConfig(path=str(path), max_len=32, weights_file=str(tmp_path / "sel"))
    with pytest.raises(DataError, match=r"no weight for 1 training row\(s\) of .* \(row ids \[2\]\).*missing_weight"):
        load_objective_data(cfg, "sft", tiny_tokenizer)
    cfg.missing_weight = 1.0
    assert load_objective_data(cfg, "sft", tiny_tokenizer).weights.tolist() == [0.5, 1.5, 1.0, 2.0]
    write_weights(table([0, 1, 2, 3], [1, -0.5, 1, 1]), tmp_path / "neg", ["parquet"], {})
    with pytest.raises(DataError, match=r"weights.parquet: row_id 1 has weight -0.5"):
        load_objective_data(DataConfig(path=str(path), max_len=32, weights_file=str(tmp_path / "neg")), "sft",
                            tiny_tokenizer)
    write_weights(table([0, 1, 2, 3], [0, 0, 0, 0]), tmp_path / "zero", ["parquet"], {})
    with pytest.raises(DataError, match="every training row has weight 0"):
        load_objective_data(DataConfig(path=str(path), max_len=32, weights_file=str(tmp_path / "zero")), "sft",
                            tiny_tokenizer)
    with pytest.raises(DataError, match="no selector weights file"):
        load_objective_data(DataConfig(path=str(path), max_len=32, weights_file=str(tmp_path / "nowhere")), "sft",
                            tiny_tokenizer)


@pytest.mark.parametrize("overrides,message", [
    (("objectives.0.data.missing_weight=1.0",), "missing_weight is the weight of rows data.weights_file"),
    (("objectives.0.data.weights_file=x", "objectives.0.data.missing_weight=-1"), "missing_weight must be a finite"),
    (("objectives.0.data.weight_key=",), "weight_key names a column"),
])
def test_weight_config_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, *overrides)

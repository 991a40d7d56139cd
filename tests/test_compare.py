"""``bipost compare`` / ``bipost sweep`` on a tiny budget: the runs, the plot and the tables."""

from __future__ import annotations

import json
import math

import pytest

from bipost.cli.main import main

from helpers import workspace


def base_overrides() -> list[str]:
    ws = workspace()
    return [f"model.path={ws / 'model'}", "train.max_steps=2", "train.eval_steps=1", "train.progress=false",
            "train.batch_size=4", "train.micro_batch_size=4", "optim.lr=1e-3",
            "objectives.0.kind=sft", f"objectives.0.data.path={ws / 'sft.jsonl'}",
            "objectives.1.kind=dpo", f"objectives.1.data.path={ws / 'pref.jsonl'}",
            "objectives.0.data.max_len=64", "objectives.1.data.max_len=64",
            "objectives.0.data.eval_fraction=0.1", "objectives.1.data.eval_fraction=0.1"]


def test_compare_writes_plot_and_tables(tmp_path, capsys):
    """Four methods, 2 steps each, evaluated at steps 0, 1, 2. f*_dpo is given; f*_sft is measured
    by training SFT alone (--ideal). The table's numbers are checked against the runs' own records."""
    out = tmp_path / "cmp"
    assert main(["compare", *base_overrides(), "objectives.1.optimum=0.5", "--ideal", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"loss-space plot: {out / 'loss_space.png'}" in printed
    assert (out / "loss_space.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "compare.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["sequential", "mix", "alright", "maxright"]
    runs = {r["method"]: r for r in report["runs"]}
    for m, run in runs.items():
        assert [e["step"] for e in run["trajectory"]] == [0, 1, 2]
        assert rows[m]["f_sft"] == run["trajectory"][-1]["sft"] and rows[m]["f_dpo"] == run["trajectory"][-1]["dpo"]
        assert sum(run["ran"].values()) >= 2 and rows[m]["steps"] == 2
    # every method starts from the same model: the step-0 evaluation is shared
    assert len({json.dumps(run["trajectory"][0]) for run in runs.values()}) == 1
    assert (rows["sequential"]["steps_sft"], rows["sequential"]["steps_dpo"]) == (1, 1)
    assert (rows["mix"]["steps_sft"], rows["mix"]["steps_dpo"]) == (2, 2)
    assert rows["sequential"]["time_vs_sequential"] == 1.0 and rows["sequential"]["tokens_vs_sequential"] == 1.0
    assert rows["mix"]["tokens"] > rows["sequential"]["tokens"]  # both objectives' batches every step
    # the ideal point: the given f*_dpo, and the best held-out SFT loss of the SFT-alone run
    (alone,) = report["ideal_runs"]
    assert alone["method"] == "sft alone" and set(alone["ran"]) == {"sft"}
    assert report["ideal"] == {"sft": min(e["sft"] for e in alone["trajectory"]), "dpo": 0.5}
    for r in rows.values():
        assert r["distance_to_ideal"] == pytest.approx(
            math.hypot(r["f_sft"] - report["ideal"]["sft"], r["f_dpo"] - 0.5))
    table = (out / "compare.md").read_text()
    assert table.count("\n| ") == 5 and "| mix |" in table and "distance to ideal" in table


def test_sweep_traces_a_front_per_method(tmp_path):
    out = tmp_path / "sweep"
    assert main(["sweep", *base_overrides(), "--lambdas", "0.25,0.75", "--methods", "alright,mix",
                 "--out", str(out)]) == 0
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "sweep.json").read_text())
    assert [(r["method"], r["lambda"]) for r in report["rows"]] == [
        ("alright", 0.25), ("mix", 0.25), ("alright", 0.75), ("mix", 0.75)]
    assert (out / "lambda-0.25" / "mix" / "final").is_dir()
    assert "| alright | 0.75 |" in (out / "sweep.md").read_text()


def test_compare_needs_eval_data(tmp_path, capsys):
    overrides = [o for o in base_overrides() if "eval_fraction" not in o]
    assert main(["compare", *overrides, "--out", str(tmp_path / "x")]) == 2
    assert "objective sft has no eval data" in capsys.readouterr().err


def test_compare_demo_yaml_is_the_demo_comparison(tmp_path):
    """configs/compare_demo.yaml is what `bipost demo` compares (with the demo's paths)."""
    from pathlib import Path

    from bipost.configio import load_config
    from bipost.demo.compare import compare_config

    demo = compare_config(tmp_path, tmp_path / "sft" / "final", steps=120)
    yaml = Path(__file__).parents[1] / "configs" / "compare_demo.yaml"
    from_yaml = load_config(yaml, [f"model.path={tmp_path / 'sft' / 'final'}", f"train.output_dir={tmp_path}",
                                   f"objectives.0.data.path={tmp_path / 'data' / 'copy.jsonl'}",
                                   f"objectives.1.data.path={tmp_path / 'data' / 'copy_prefers_reverse.jsonl'}"])
    assert from_yaml == demo


def test_budget_is_fixed_before_the_runs_by_the_loops_rule(tmp_path):
    """Without train.max_steps, compare/sweep fix the budget up front with the loop's own epochs
    rule, so every method (and every lambda) gets the same number of steps."""
    from bipost.configio import load_config
    from bipost.report.compare import resolve_budget
    from bipost.run import build_trainer

    overrides = [o for o in base_overrides() if not o.startswith("train.max_steps")]
    cfg = load_config(overrides=[*overrides, "schedule.name=mix", "train.epochs=1.5",
                                 f"train.output_dir={tmp_path / 'run'}"])
    assert cfg.train.max_steps is None
    # 58 training rows per objective after holding out 10% of 64: ceil(1.5 * ceil(58 / 4)) = ceil(22.5)
    assert resolve_budget(cfg) == build_trainer(cfg).max_steps == 23


def test_a_requeued_compare_continues_its_runs(tmp_path):
    """A compare run again into the same folder (a requeued job after preemption) continues every
    method's run (train.resume=auto) instead of refusing the folder, and reports the same table:
    the histories come from each run's metrics.jsonl, steps before the resume included."""
    out = tmp_path / "cmp"
    args = ["compare", *base_overrides(), "train.save_steps=1", "--methods", "alright,mix", "--out", str(out)]
    assert main(args) == 0
    first = json.loads((out / "compare.json").read_text())
    assert main(args) == 0
    again = json.loads((out / "compare.json").read_text())
    for a, b in zip(first["runs"], again["runs"]):
        assert a["trajectory"] == b["trajectory"] and a["ran"] == b["ran"]
    assert [r["steps"] for r in again["rows"]] == [2, 2]

"""``bipost compare`` / ``sweep`` with an eval section: a column per benchmark and generation
measure in compare.md / compare.json, and a plot of a chosen pair of measures per method."""

from __future__ import annotations

import json
from pathlib import Path

from bipost.cli.main import main
from bipost.report.compare import MethodResult
from bipost.report.tables import comparison_rows, markdown, measure_keys, measure_label

from helpers import workspace


def judge_by_length(prompts, completions, **columns):
    """A win-rate judge for the tests: the number of words of a response."""
    return [float(len(c.split())) for c in completions]


def _result(method: str, final: dict) -> MethodResult:
    return MethodResult(method, Path("x"), 2, 1.0, 10, {"sft": 1, "dpo": 1}, [{"step": 2, **final}])


def test_rows_and_markdown_carry_the_measures():
    """Benchmarks first (sorted), then exact match / F1 / win rate in the order measured; other
    generation metrics (length, truncated) stay out; a measure one run lacks is None ("–")."""
    a = _result("alright", {"sft": 1.0, "dpo": 0.5, "gen/sft/exact_match": 0.25, "gen/sft/length": 4.0,
                            "gen/dpo/win_rate": 0.625, "bench/mmlu/acc": 0.5, "bench/arc_easy/acc_norm": 0.75})
    s = _result("sequential", {"sft": 1.5, "dpo": 0.4, "gen/sft/exact_match": 0.0, "gen/dpo/win_rate": 0.75})
    assert measure_keys([a.final, s.final]) == ["bench/arc_easy/acc_norm", "bench/mmlu/acc", "gen/sft/exact_match",
                                                "gen/dpo/win_rate"]
    rows = comparison_rows([s, a], ["sft", "dpo"], {"sft": None, "dpo": None})
    assert rows[1]["bench/mmlu/acc"] == 0.5 and rows[1]["gen/dpo/win_rate"] == 0.625
    assert rows[0]["bench/mmlu/acc"] is None and "gen/sft/length" not in rows[0]
    table = markdown(rows, ["sft", "dpo"])
    header = table.splitlines()[0]
    assert "| arc_easy acc norm | mmlu acc | sft exact match | dpo win rate |" in header
    assert "| sequential | 1.5000 | 0.4000 | – | – | – | 0.000 | 0.750 |" in table
    assert "| alright | 1.0000 | 0.5000 | – | 0.750 | 0.500 | 0.250 | 0.625 |" in table
    assert measure_label("gen/dpo/win_rate") == "dpo win rate"


def test_compare_reports_generation_measures_and_plots_a_pair(tmp_path, capsys):
    """Two methods with generation metrics (a word-count judge for DPO's win rate) at their last
    evaluation: the columns hold each run's own last-evaluation values, and measures.png plots the
    pair asked for; a pair that was not measured is reported, not plotted."""
    ws = workspace()
    base = [f"model.path={ws / 'model'}", "train.max_steps=2", "train.eval_steps=1", "train.progress=false",
            "train.batch_size=4", "train.micro_batch_size=4", "optim.lr=1e-3",
            "objectives.0.kind=sft", f"objectives.0.data.path={ws / 'sft.jsonl'}",
            "objectives.1.kind=dpo", f"objectives.1.data.path={ws / 'pref.jsonl'}",
            "objectives.0.data.max_len=64", "objectives.1.data.max_len=64",
            "objectives.0.data.eval_fraction=0.1", "objectives.1.data.eval_fraction=0.1",
            "eval.generate=true", "eval.max_prompts=3", "eval.max_new_tokens=4",
            "eval.judge.function=test_eval_compare:judge_by_length"]
    out = tmp_path / "cmp"
    assert main(["compare", *base, "--methods", "alright,mix", "--measures", "gen/sft/f1,gen/dpo/win_rate",
                 "--out", str(out)]) == 0
    assert f"measures plot: {out / 'measures.png'}" in capsys.readouterr().out
    assert (out / "measures.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "compare.json").read_text())
    assert report["measures"] == ["gen/sft/exact_match", "gen/sft/f1", "gen/dpo/exact_match", "gen/dpo/f1",
                                  "gen/dpo/win_rate"]
    assert report["measures_plotted"] == ["gen/sft/f1", "gen/dpo/win_rate"]
    for row, run in zip(report["rows"], report["runs"]):
        last = run["trajectory"][-1]
        assert last["step"] == 2 and "gen/sft/f1" not in run["trajectory"][0]  # only the last evaluation
        assert all(row[k] == last[k] for k in report["measures"])
    assert "| sft exact match | sft f1 | dpo exact match | dpo f1 | dpo win rate |" in (out / "compare.md").read_text()

    assert main(["compare", *base, "--methods", "mix", "--measures", "bench/mmlu/acc,gen/dpo/win_rate",
                 "--out", str(tmp_path / "other")]) == 0
    assert "no plot of bench/mmlu/acc, gen/dpo/win_rate: bench/mmlu/acc was not measured" in capsys.readouterr().out
    assert not (tmp_path / "other" / "measures.png").exists()
    assert main(["compare", *base, "--measures", "only_one", "--out", str(tmp_path / "bad")]) == 2


def test_default_pair_plots_different_things():
    """A benchmark against a win rate (the papers' MMLU vs win rate), else against another
    objective's measure; never two metrics of one objective when another exists."""
    from bipost.report.compare import default_pair

    assert default_pair(["bench/mmlu/acc", "bench/arc/acc", "gen/sft/exact_match", "gen/dpo/win_rate"]) == \
        ["bench/mmlu/acc", "gen/dpo/win_rate"]
    assert default_pair(["gen/sft/exact_match", "gen/sft/f1", "gen/dpo/exact_match", "gen/dpo/f1"]) == \
        ["gen/sft/exact_match", "gen/dpo/exact_match"]
    assert default_pair(["gen/sft/exact_match", "gen/sft/f1"]) == ["gen/sft/exact_match", "gen/sft/f1"]
    assert default_pair(["bench/mmlu/acc"]) is None

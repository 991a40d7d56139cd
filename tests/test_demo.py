"""`bipost demo --quick` end to end through the CLI: builds its own model and data offline and
writes loadable models, metrics and the comparison's plot and tables."""

from __future__ import annotations

import json

from bipost.cli.main import main


def test_demo_quick_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    assert "[demo] SFT:" in printed and "[demo] DPO" in printed
    for run in ("sft", "dpo"):
        assert (out / run / "final" / "model.safetensors").exists()
        assert (out / run / "metrics.jsonl").stat().st_size > 0
    assert (out / "compare" / "loss_space.png").exists()
    assert (out / "compare" / "compare.md").exists()
    # each method's task accuracy: exact match of its generations on both objectives' held-out prompts
    assert "copy accuracy" in printed and "reverse accuracy" in printed
    assert (out / "compare" / "measures.png").exists()
    assert "sft_copy exact match" in (out / "compare" / "compare.md").read_text()


def test_grpo_demo_quick_runs_end_to_end(tmp_path, capsys):
    """`bipost demo grpo --quick`: a start model, then GRPO alone and the four methods next to SFT,
    each evaluated on both objectives; the table and the loss-space plot are written."""
    out = tmp_path / "grpo"
    assert main(["demo", "grpo", "--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    table = (out / "table.md").read_text()
    for method in ("grpo alone", "sequential", "mix", "alright", "maxright"):
        assert f"| {method} |" in table and (out / method.replace(" ", "-") / "final" / "model.safetensors").exists()
    assert "copy accuracy" in printed and (out / "loss_space.png").exists()
    results = json.loads((out / "results.json").read_text())["results"]
    assert results[0]["steps_sft"] == 0 and results[0]["steps_grpo"] == 3  # GRPO alone trains GRPO only

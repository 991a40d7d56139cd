"""`bipost demo --quick` end to end through the CLI: builds its own model and data offline and
writes loadable models, metrics and the comparison's plot and tables."""

from __future__ import annotations

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

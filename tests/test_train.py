"""End-to-end equivalences of the training loop on a tiny model (CPU, fp32)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bipost.run import build_trainer, train
from bipost.train.metrics import read_metrics

from helpers import config, workspace


def losses(result, name):
    return [r[name] for r in result.train_losses if name in r]


@pytest.mark.parametrize("kind", ["sft", "dpo", "kd"])
def test_micro_batch_times_accumulation_is_one_big_batch(tmp_path, kind):
    """Micro-batch 2 x accumulation 4 gives the same losses and weights as 8 x 1: every objective
    normalizes by the step's global unit count (tokens or pairs), not per micro-batch."""
    big = train(config(tmp_path / "big", "train.micro_batch_size=8", kinds=(kind,)))
    small = train(config(tmp_path / "small", "train.micro_batch_size=2", kinds=(kind,)))
    torch.testing.assert_close(torch.tensor(losses(big, kind)), torch.tensor(losses(small, kind)),
                               rtol=1e-5, atol=1e-6)
    from safetensors.torch import load_file

    a = load_file(big.final_dir / "model.safetensors")
    b = load_file(small.final_dir / "model.safetensors")
    # Adam divides by sqrt(v): where a gradient is ~0, float rounding can move a weight by up to
    # ~lr per step, so weights are compared to a fraction of one step (lr 1e-3).
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-4)


def test_resume_continues_exactly(tmp_path):
    """Train 6 steps saving at 3; resume from the step-3 checkpoint: steps 4-6 are bit-identical."""
    cfg = config(tmp_path / "run", "train.max_steps=6", "train.save_steps=3", "optim.scheduler=cosine",
                 "optim.warmup_steps=2", kinds=("sft", "dpo"))
    full = train(cfg)
    ckpts = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step-00000003"]
    shutil.rmtree(tmp_path / "run" / "final")
    cfg.train.resume = True
    resumed = build_trainer(cfg)
    assert resumed.step == 3
    rest = resumed.train()
    assert [r for r in rest.train_losses] == full.train_losses[3:]


def test_resume_after_sigkill(tmp_path):
    """A run killed with SIGKILL mid-training resumes from its last complete checkpoint and its
    losses continue exactly as the uninterrupted run's."""
    ws = workspace()
    out = tmp_path / "killed"
    args = [f"model.path={ws / 'model'}", "objectives.0.kind=sft", f"objectives.0.data.path={ws / 'sft.jsonl'}",
            "objectives.0.data.max_len=64", "train.max_steps=120", "train.save_steps=4",
            "train.batch_size=8", "train.micro_batch_size=4", "optim.lr=1e-3", "train.progress=false"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "bipost.cli.main", "train", *args, f"train.output_dir={out}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 10:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(read_metrics(metrics))
    assert killed_at < 120, "the run finished before it could be killed"
    done = subprocess.run([sys.executable, "-m", "bipost.cli.main", "train", *args, f"train.output_dir={out}",
                           "train.resume=true"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[resume] from" in done.stdout
    from bipost.configio import load_config

    ref = train(load_config(overrides=args + [f"train.output_dir={tmp_path / 'ref'}"]))
    got = [r["loss/sft"] for r in read_metrics(metrics) if r.get("kind", "train") == "train"]
    assert got == losses(ref, "sft")


def test_lora_reference_is_the_base_model(tmp_path):
    """With LoRA and no reference given, the reference is the policy with its adapter disabled;
    it gives the same DPO losses as loading the base model separately as the reference."""
    ws = workspace()
    lora = ["model.lora.rank=4", "model.lora.alpha=8", "train.max_steps=3"]
    shared = train(config(tmp_path / "a", *lora, kinds=("dpo",)))
    separate = train(config(tmp_path / "b", *lora, f"objectives.0.reference={ws / 'model'}", kinds=("dpo",)))
    assert losses(shared, "dpo") == pytest.approx(losses(separate, "dpo"), rel=1e-6)
    assert losses(shared, "dpo")[0] == pytest.approx(0.6931472, abs=1e-6)  # policy == reference at step 0


def test_cli_trains_saves_and_reloads_with_transformers_and_peft(tmp_path):
    """`bipost train` end to end; the result loads with plain transformers / peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from bipost.cli.main import main

    ws = workspace()
    out = tmp_path / "cli"
    code = main(["train", f"model.path={ws / 'model'}", "model.lora.rank=4", "model.lora.save_merged=true",
                 "objectives.0.kind=sft", f"objectives.0.data.path={ws / 'sft.jsonl'}",
                 "objectives.0.data.max_len=64", "train.max_steps=3", "train.progress=false",
                 f"train.output_dir={out}", "optim.lr=1e-2"])
    assert code == 0
    assert (out / "config.yaml").exists() and (out / "metrics.jsonl").exists()
    assert (out / "final" / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(ws / "model")
    peft_model = PeftModel.from_pretrained(base, out / "final").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "final-merged").eval()
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-5)
        plain = AutoModelForCausalLM.from_pretrained(ws / "model").eval()(ids).logits
    assert not torch.allclose(plain, merged(ids).logits)  # training changed the model
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("kind", "train") == "train"] == [1, 2, 3]
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["ran"] == ["sft"]


def test_existing_checkpoints_are_never_overwritten_silently(tmp_path):
    cfg = config(tmp_path / "r", "train.max_steps=2", "train.save_steps=1")
    train(cfg)
    with pytest.raises(FileExistsError, match="train.resume=true"):
        build_trainer(config(tmp_path / "r", "train.max_steps=2"))

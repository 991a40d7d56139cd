"""Real multi-rank runs never hang, never train on NaN, survive preemption, and trust their checkpoints.

Everything is exercised through public entry points (``Trainer`` / ``train()``, the ``bipost`` CLI,
torchrun workers), on the tiny workspace of ``tests/helpers.py``, gloo on CPU for 2 ranks.
"""

from __future__ import annotations

import errno
import importlib.util
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

from bipost.configio import ConfigError, load_config
from bipost.train import checkpoint as ckpt
from bipost.train import resume as resuming
from bipost.run import train
from bipost.train.loop import Trainer
from bipost.train.metrics import read_metrics

from helpers import config, workspace
from two_ranks import launch_one

WORKER = Path(__file__).with_name("reliability_worker.py")
SRC = str(Path(__file__).parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def base(*extra: str, steps: int = 2) -> list[str]:
    """SFT (1 held-out row) + DPO (3 held-out rows), mixed; evaluation one row per batch, every step:
    with 2 ranks, rank 0 runs one SFT eval batch and rank 1 none; rank 0 2 DPO batches, rank 1 one."""
    ws = workspace()
    return [f"model.path={ws / 'model'}", "train.progress=false", f"train.max_steps={steps}", "train.batch_size=8",
            "train.micro_batch_size=4", "optim.lr=1e-3", "schedule.name=mix", "train.eval_steps=1",
            "train.eval_batch_size=1",
            "objectives.0.kind=sft", f"objectives.0.data.path={ws / 'sft.jsonl'}", "objectives.0.data.max_len=64",
            "objectives.0.data.eval_fraction=0.1", "objectives.0.data.max_eval_samples=1",
            "objectives.1.kind=dpo", f"objectives.1.data.path={ws / 'pref.jsonl'}", "objectives.1.data.max_len=64",
            "objectives.1.data.eval_fraction=0.1", "objectives.1.data.max_eval_samples=3", *extra]


CACHED_DPO = [  # a third objective: DPO with cached reference log-probs over an odd number (33) of examples
    "objectives.2.kind=dpo", "objectives.2.data.path={ws}/pref.jsonl", "objectives.2.data.max_len=64",
    "objectives.2.data.max_samples=33", "objectives.2.data.eval_fraction=0.1", "objectives.2.data.max_eval_samples=1",
    "objectives.2.cache_reference=true"]


def cached_dpo() -> list[str]:
    return [a.replace("{ws}", str(workspace())) for a in CACHED_DPO]


def launch_runs(out: Path, runs: list, env: dict | None = None) -> list[dict]:
    """``runs`` ([name, overrides]) on 2 ranks in a launch of their own; what each rank recorded."""
    return launch_one(out, "runs", [runs], env)


def assert_same_run(ranks: list[dict], name: str, single, backend: str) -> None:
    """Both ranks issued the same sequence of collectives (what NCCL needs not to hang) and report the
    1-rank run's held-out and training losses (same global batch)."""
    assert ranks[0][name]["collectives"] == ranks[1][name]["collectives"]
    for r in ranks:
        got = r[name]
        assert got["backend"] == backend
        assert [e["step"] for e in got["eval"]] == [e["step"] for e in single.eval_history]
        for mine, ref in zip(got["eval"], single.eval_history):
            assert mine.keys() == ref.keys()
            for k in ref:
                assert mine[k] == pytest.approx(ref[k], rel=1e-6), (name, k, mine, ref)
        torch.testing.assert_close(torch.tensor([[s[n] for n in s["ran"]] for s in got["train"]]),
                                   torch.tensor([[s[n] for n in s["ran"]] for s in single.train_losses]),
                                   rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- 1. forwards outside the training step
def test_ddp_uneven_evaluation_and_lora_reference_cache_equal_one_rank(tmp_path, two_ranks):
    """The wrapped DDP model broadcasts its buffers (the rotary ``inv_freq``) in the first forward after
    a training step, so after step 1 rank 0 (one SFT eval row) waited in that broadcast while rank 1
    (none) waited in the loss all-reduce: forever, on NCCL. (Gloo lets rank 0's broadcast return at
    once, hence the comparison of the collectives each rank issued.) Now no-grad forwards go through
    the engine (DDP's inner module).

    * full fine-tuning: SFT + DPO (frozen reference replica), 1 + 3 held-out rows in batches of 1;
    * LoRA: the same, DPO's reference is the DDP-wrapped policy with its adapter disabled, plus a
      DPO objective whose reference log-probs are cached: 33 examples built over 2 ranks (17 + 16).

    Both ranks report exactly the held-out losses of the 1-rank runs (each of 3 evaluations)."""
    runs = [["full", base()], ["lora", base("model.lora.rank=4", *cached_dpo())]]
    ranks = two_ranks("ddp_uneven")  # these runs (tests/two_ranks.py)
    for name, args in runs:
        single = train(load_config(overrides=args + [f"train.output_dir={tmp_path / ('one-' + name)}"]))
        assert len(single.eval_history) == 3 and {"sft", "dpo"} <= single.eval_history[0].keys()
        assert_same_run(ranks, name, single, "ddp")
    assert "dpo_2" in ranks[0]["lora"]["eval"][0]


def test_fsdp2_uneven_evaluation_and_sharded_reference_cache_equal_one_rank(tmp_path, two_ranks):
    """FSDP2: every forward gathers parameters, so ranks must run the same number. The sharded frozen
    reference builds the DPO cache over 33 examples (rank 0: 17 batches, rank 1: 16 plus one
    uncounted filler) and evaluation pads the same way; the results equal 1 rank's."""
    args = base("dist.backend=fsdp2", *cached_dpo())
    ranks = two_ranks("fsdp2_uneven")  # this run (tests/two_ranks.py)
    single = train(load_config(overrides=[a for a in args if not a.startswith("dist.")]
                               + [f"train.output_dir={tmp_path / 'one'}"]))
    assert_same_run(ranks, "run", single, "fsdp2")


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="DeepSpeed is an optional extra (pip install -e '.[deepspeed]')")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_uneven_evaluation_equals_one_rank(tmp_path, stage):
    """ZeRO-2 (replicated forwards) and ZeRO-3 (partitioned: lockstep forwards), LoRA, uneven evaluation."""
    args = base("model.lora.rank=4", f"dist.zero_stage={stage}")
    ranks = launch_runs(tmp_path / "ds", [["run", args]], env={"DS_ACCELERATOR": "cpu"})
    single = train(load_config(overrides=[a for a in args if not a.startswith("dist.")]
                               + [f"train.output_dir={tmp_path / 'one'}"]))
    assert_same_run(ranks, "run", single, "deepspeed")


# ---------------------------------------------------------------- 2. a hang becomes an error
def test_hung_rank_is_an_error_naming_the_stage(tmp_path):
    """Rank 1 hangs right after optimizer step 1 (for up to 60 s); with ``dist.timeout=10`` rank 0,
    waiting in the evaluation at step 1, fails after 10 s with an error naming that stage and exits
    with code 5; torchrun then stops rank 1, whose next collective fails the same way. The whole
    launch takes seconds instead of waiting forever."""
    spec = [["hang", base("dist.timeout=10", steps=3)], 1, 1, 60]
    t0 = time.time()
    proc = subprocess.run([*TORCHRUN, str(WORKER), str(tmp_path), "stall", json.dumps(spec)], env=ENV,
                          capture_output=True, text=True, timeout=120)
    elapsed = time.time() - t0
    assert proc.returncode != 0
    err = proc.stderr
    assert "worker: error (rank 0): rank 0/2: a collective operation failed during eval at step 1 " \
           "(dist.timeout=10s)" in err, err[-4000:]
    assert "exitcode  : 5" in err, err[-3000:]
    assert elapsed < 45


# ---------------------------------------------------------------- 3. non-finite steps
def poisoned_model(tmp_path: Path, token: str) -> tuple[Path, int]:
    """The tiny model with ``token``'s input embedding set to NaN: every row holding the token gets a
    NaN loss (attention spreads it over the row), every other row is untouched."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ws = workspace()
    tok = AutoTokenizer.from_pretrained(ws / "model")
    (tid,) = tok.encode(token, add_special_tokens=False) if token != tok.eos_token else (tok.eos_token_id,)
    model = AutoModelForCausalLM.from_pretrained(ws / "model")
    with torch.no_grad():
        model.get_input_embeddings().weight[tid] = float("nan")
    out = tmp_path / "poisoned"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, tid


def marked_rows(tmp_path: Path, rows: set[int]) -> Path:
    """sft.jsonl with a "~" (a byte no other row holds) appended to the inputs of ``rows``."""
    lines = (workspace() / "sft.jsonl").read_text().splitlines()
    out = tmp_path / "marked.jsonl"
    out.write_text("".join(
        json.dumps({**r, "input": r["input"] + " ~"} if i in rows else r) + "\n"
        for i, r in enumerate(map(json.loads, lines))))
    return out


def test_nonfinite_rows_are_skipped_logged_and_counted(tmp_path, caplog):
    """LoRA on a model whose "~" embedding is NaN, 8 steps (one pass) over 64 rows of which rows 5 and
    37 hold "~". Expected (streams are a pure function of the step): exactly the steps whose batch
    holds row 5 or 37 are skipped, each logged with those row ids; ``skipped_steps`` counts them; the
    LR schedule (linear) does not advance on a skipped step; every other step is finite and the
    trained adapter is finite."""
    model, _ = poisoned_model(tmp_path, "~")
    data = marked_rows(tmp_path, {5, 37})
    cfg = config(tmp_path / "run", f"model.path={model}", f"objectives.0.data.path={data}", "model.lora.rank=4",
                 "train.max_steps=8", "optim.scheduler=linear")
    trainer = Trainer(cfg)
    run = trainer.runs["sft"]
    batch_rows = [{run.train[i].row_id for i in run.stream.indices(k)} for k in range(8)]
    expected = {k + 1: sorted(rows & {5, 37}) for k, rows in enumerate(batch_rows) if rows & {5, 37}}
    assert 1 <= len(expected) <= 2
    with caplog.at_level("WARNING", logger="bipost"):
        result = trainer.train()
    recs = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("kind", "train") == "train"]
    skipped = {r["step"]: r["skipped_rows"]["sft"] for r in recs if r.get("skipped")}
    assert skipped == expected
    assert recs[-1]["skipped_steps"] == len(expected)
    for step, rows in expected.items():
        assert f"[skip] step {step}: non-finite loss sft=nan; objective(s) sft; rows sft: {rows}" in caplog.text
    lrs = [r["lr"] for r in recs]
    applied = 0
    for r, lr in zip(recs, lrs):  # linear decay over 8 steps, advanced only by applied steps
        assert lr == pytest.approx(1e-3 * (1 - applied / 8))
        applied += not r.get("skipped")
    assert all(torch.isfinite(torch.tensor(r["loss/sft"])) for r in recs if not r.get("skipped"))
    from safetensors.torch import load_file

    adapter = load_file(result.final_dir / "adapter_model.safetensors")
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="DeepSpeed is an optional extra (pip install -e '.[deepspeed]')")
def test_nonfinite_rows_under_deepspeed(tmp_path):
    """The same run under DeepSpeed ZeRO-2 (one rank, CPU): DeepSpeed's optimizer step runs inside the
    last micro-batch's backward and its own overflow check skips the update; the loop skips the LR
    step, logs the same rows and counts the same steps, and the adapter stays finite."""
    model, _ = poisoned_model(tmp_path, "~")
    data = marked_rows(tmp_path, {5, 37})
    out = tmp_path / "ds"
    args = [f"model.path={model}", "model.lora.rank=4", "objectives.0.kind=sft", f"objectives.0.data.path={data}",
            "objectives.0.data.max_len=64", "train.max_steps=8", "train.batch_size=8", "train.micro_batch_size=8",
            "optim.lr=1e-3", "optim.scheduler=linear", "train.progress=false", "dist.backend=deepspeed",
            "dist.zero_stage=2"]
    proc = subprocess.run([sys.executable, "-m", "bipost.cli.main", "train", *args, f"train.output_dir={out}"],
                          env={**ENV, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trainer = Trainer(load_config(overrides=[a for a in args if not a.startswith("dist.")]
                                  + [f"train.output_dir={tmp_path / 'plan'}"]))
    run = trainer.runs["sft"]
    batch_rows = [{run.train[i].row_id for i in run.stream.indices(k)} for k in range(8)]
    expected = {k + 1: sorted(rows & {5, 37}) for k, rows in enumerate(batch_rows) if rows & {5, 37}}
    recs = [r for r in read_metrics(out / "metrics.jsonl") if r.get("kind", "train") == "train"]
    assert {r["step"]: r["skipped_rows"]["sft"] for r in recs if r.get("skipped")} == expected
    applied = 0
    for r in recs:
        assert r["lr"] == pytest.approx(1e-3 * (1 - applied / 8))
        applied += not r.get("skipped")
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(out / "final" / "adapter_model.safetensors").values())


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path, capsys):
    """With EOS's embedding NaN every row's loss is NaN: ``train.max_skipped_steps=2`` stops the
    run at step 2 with a clear error, exit code 3 from the CLI."""
    from bipost.cli.main import main

    model, _ = poisoned_model(tmp_path, "<eos>")
    ws = workspace()
    code = main(["train", f"model.path={model}", "model.lora.rank=4", "objectives.0.kind=sft",
                 f"objectives.0.data.path={ws / 'sft.jsonl'}", "objectives.0.data.max_len=64", "train.max_steps=6",
                 "train.progress=false", "train.max_skipped_steps=2", f"train.output_dir={tmp_path / 'run'}"])
    assert code == 3
    err = capsys.readouterr().err
    assert "2 steps in a row had a non-finite loss or gradient norm (train.max_skipped_steps=2); last at step 2" in err
    assert not (tmp_path / "run" / "final").exists()


def test_nonfinite_weights_are_never_saved(tmp_path, capsys):
    """Full fine-tuning of the poisoned model: the NaN embedding row is a trained weight, so the
    first checkpoint is refused (exit code 3) and nothing that looks like a checkpoint is left."""
    from bipost.cli.main import main

    model, _ = poisoned_model(tmp_path, "~")
    ws = workspace()
    out = tmp_path / "run"
    code = main(["train", f"model.path={model}", "objectives.0.kind=sft", f"objectives.0.data.path={ws / 'sft.jsonl'}",
                 "objectives.0.data.max_len=64", "train.max_steps=3", "train.save_steps=1", "train.progress=false",
                 f"train.output_dir={out}"])
    assert code == 3
    assert "not writing checkpoint step-00000001: 1 trained weight tensor(s) hold inf / NaN " \
           "(model.embed_tokens.weight)" in capsys.readouterr().err
    assert not ckpt.list_complete(out) and not list((out / "checkpoints").glob(".tmp-*"))


# ---------------------------------------------------------------- 4. preemption
def preempt_args(out: Path) -> list[str]:
    """ALRIGHT over SFT + DPO (its draws are state a resume must restore), evaluation every 4 steps,
    no periodic checkpoints: the only checkpoint is the one the signal makes."""
    return base("schedule.name=alright", "train.eval_steps=4", "train.resume=auto", "train.save_steps=0",
                f"train.output_dir={out}", steps=12)


def wait_for_steps(metrics: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and sum('"ran"' in line for line in metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.005)
    raise AssertionError(f"the run did not reach {n} steps: {proc.poll()}")


def train_and_eval(metrics: Path) -> tuple[list, list]:
    recs = read_metrics(metrics)
    return ([(r["step"], r["ran"], [r[f"loss/{n}"] for n in r["ran"]]) for r in recs if r.get("kind", "train") == "train"],
            [r for r in recs if r.get("kind") == "eval"])


def test_signal_checkpoints_and_the_same_command_resumes_exactly(tmp_path):
    """``bipost train … train.resume=auto`` gets SIGTERM mid-run: it finishes the step, writes a
    checkpoint of it and exits with 75; the very same command then continues, and the per-step
    losses and evaluations equal the uninterrupted run's exactly."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "bipost.cli.main", "train", *preempt_args(out)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(out / "metrics.jsonl", 3, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-3000:]
    (saved,) = ckpt.list_complete(out)
    stopped_at = int(saved.name.split("-")[1])
    assert f"[preempted] stopped by SIGTERM after step {stopped_at}" in stdout
    assert 3 <= stopped_at < 12
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"[resume] from {saved} (step {stopped_at})" in again.stdout
    ref = tmp_path / "ref"
    train(load_config(overrides=preempt_args(ref)))
    assert train_and_eval(out / "metrics.jsonl") == train_and_eval(ref / "metrics.jsonl")


def rank_pid(parent: int, rank: int, timeout: float = 60) -> int:
    """The pid of torchrun worker ``rank`` (a child of ``parent`` whose environment has RANK=rank)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                env = (d / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == parent and f"RANK={rank}".encode() in env:
                return int(d.name)
        time.sleep(0.05)
    raise AssertionError(f"no rank {rank} worker under pid {parent}")


def test_signal_to_one_rank_stops_every_rank_and_resumes_exactly(tmp_path):
    """Under torchrun (2 ranks, DDP) SIGUSR1 reaches rank 1 only. The flag travels in the step's
    all-reduce, so both ranks stop after the same step, write one complete checkpoint and exit 75;
    the same command resumes, and the per-step losses and evaluations equal an uninterrupted
    2-rank run's exactly."""
    out = tmp_path / "run"
    cmd = [*TORCHRUN, "-m", "bipost.cli.main", "train", *preempt_args(out)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(out / "metrics.jsonl", 3, proc)
    os.kill(rank_pid(proc.pid, 1), signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0  # torchrun reports its workers' exit code 75 as a failure
    assert stderr.count("exitcode  : 75") == 2, stderr[-3000:]  # both ranks
    (saved,) = ckpt.list_complete(out)
    stopped_at = int(saved.name.split("-")[1])
    assert f"[preempted] stopped by a signal on another rank after step {stopped_at}" in stdout
    assert 3 <= stopped_at < 12
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    ref = tmp_path / "ref"
    full = subprocess.run([*TORCHRUN, "-m", "bipost.cli.main", "train", *preempt_args(ref)], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]
    assert train_and_eval(out / "metrics.jsonl") == train_and_eval(ref / "metrics.jsonl")


# ---------------------------------------------------------------- 5. checkpoints you can trust
def losses(result) -> list:
    return [(r["step"], r["ran"], [r[n] for n in r["ran"]]) for r in result.train_losses]


def run_cfg(out: Path, *extra: str):
    return config(out, "train.max_steps=6", "train.save_steps=2", "train.keep_last=3", *extra, kinds=("sft", "dpo"))


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The disk fills up while step 4's checkpoint is written (``torch.save`` of its optimizer raises
    ENOSPC): a clear error, the partial folder is gone, step 2's checkpoint is intact and complete,
    and ``train.resume=auto`` continues from it exactly as the uninterrupted run."""
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if ".tmp-step-00000004" in str(f) and str(f).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    with pytest.raises(ckpt.CheckpointWriteError) as err:
        train(run_cfg(out))
    msg = str(err.value)
    assert "checkpoint step-00000004 was not written" in msg and "(no space left on the device)" in msg
    assert f"the previous checkpoint {out / 'checkpoints' / 'step-00000002'} is intact" in msg
    from bipost.cli.common import exit_code_for

    assert exit_code_for(err.value) == 4
    assert [p.name for p in ckpt.list_complete(out)] == ["step-00000002"]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert resuming.verify_checkpoint(out / "checkpoints" / "step-00000002") == []
    monkeypatch.setattr(torch, "save", real_save)
    resumed = train(run_cfg(out, "train.resume=auto"))
    full = train(run_cfg(tmp_path / "ref"))
    assert losses(resumed) == losses(full)[2:]


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    """Checkpoints at steps 2 and 4. Step 4's weights file truncated (as by a full disk): the
    manifest check reports it and the run resumes from step 2. Then step 4's optimizer state is
    overwritten with garbage of the same size (the manifest cannot tell): loading fails, is
    reported, and again step 2 is used. Both resumed runs reproduce the uninterrupted one."""
    out = tmp_path / "run"
    full = train(run_cfg(out))
    step4 = out / "checkpoints" / "step-00000004"
    weights = step4 / "model" / "model.safetensors"
    data = weights.read_bytes()
    for damage in ("truncate", "garbage"):
        trial = tmp_path / damage
        (trial / "checkpoints").mkdir(parents=True)
        for step in ("step-00000002", "step-00000004"):
            shutil.copytree(out / "checkpoints" / step, trial / "checkpoints" / step)
        if damage == "truncate":
            (trial / "checkpoints" / "step-00000004" / "model" / "model.safetensors").write_bytes(data[: len(data) // 2])
            assert resuming.verify_checkpoint(trial / "checkpoints" / "step-00000004") == [
                f"model/model.safetensors has {len(data) // 2} bytes, {len(data)} were written"]
        else:
            opt = trial / "checkpoints" / "step-00000004" / "optimizer.pt"
            opt.write_bytes(b"\0" * opt.stat().st_size)
        capsys.readouterr()
        resumed = train(run_cfg(trial, "train.resume=auto"))
        printed = capsys.readouterr().out
        why = "is damaged" if damage == "truncate" else "could not be loaded"
        assert "[resume] checkpoint step-00000004 (" in printed and why in printed, printed
        assert f"[resume] from {trial / 'checkpoints' / 'step-00000002'} (step 2)" in printed
        assert losses(resumed) == losses(full)[2:]


def test_resuming_with_other_settings_lists_every_difference(tmp_path):
    """A checkpoint written with lr 1e-3 and 64 SFT rows, resumed with lr 5e-4, 48 rows, another seed
    and (edited into its record) another world size: an error listing the four differences and how to
    accept them. Accepted explicitly (lr, world size) it resumes; extending the step budget is always
    allowed."""
    out = tmp_path / "run"
    train(run_cfg(out, "train.max_steps=4"))
    settings = out / "checkpoints" / "step-00000002" / "settings.json"
    saved = json.loads(settings.read_text())
    settings.write_text(json.dumps({**saved, "world_size": 2}))
    marker = settings.with_name("COMPLETE")  # as a 2-rank run would have written it: the manifest agrees
    manifest = json.loads(marker.read_text())
    manifest["files"]["settings.json"] = settings.stat().st_size
    marker.write_text(json.dumps(manifest))
    changed = ("optim.lr=5e-4", "objectives.0.data.max_samples=48", "train.seed=7", "train.resume=true")
    with pytest.raises(resuming.ResumeError) as err:
        Trainer(run_cfg(out, *changed))
    msg = str(err.value)
    for line in ("objectives.0.data.max_samples: None -> 48", "optim.lr: 0.001 -> 0.0005", "train.seed: 42 -> 7",
                 "world_size: 2 -> 1"):
        assert line in msg, msg
    assert "train.resume_allow_changes=objectives.0.data.max_samples,optim.lr,train.seed,world_size" in msg
    # (a data stream refuses other data or another seed on its own: accept what can continue)
    trainer = Trainer(run_cfg(out, "optim.lr=5e-4", "train.resume=true", "train.max_steps=8",
                              "train.resume_allow_changes=optim,world_size"))
    assert trainer.step == 2 and trainer.max_steps == 8


def test_resume_modes(tmp_path):
    """false: an output_dir with checkpoints is an error; true: nothing to resume is an error;
    auto: resume if there is a checkpoint, else a fresh start (the command a requeued job reruns)."""
    out = tmp_path / "run"
    with pytest.raises(resuming.ResumeError, match="holds no complete checkpoint"):
        Trainer(run_cfg(out, "train.resume=true"))
    fresh = Trainer(run_cfg(out, "train.resume=auto", "train.max_steps=3"))
    assert fresh.step == 0
    fresh.train()
    with pytest.raises(FileExistsError, match="train.resume=true"):
        Trainer(run_cfg(out))
    assert Trainer(run_cfg(out, "train.resume=auto")).step == 2
    with pytest.raises(ConfigError, match="train.resume must be true, false or auto"):
        run_cfg(out, "train.resume=maybe")
    with pytest.raises(ConfigError, match="train.save_on_signals"):
        run_cfg(out, "train.save_on_signals=SIGKILL")
    assert run_cfg(out, "train.save_on_signals=term,usr2").train.save_on_signals == ["SIGTERM", "SIGUSR2"]

"""The suite's 2-rank scenarios (torchrun, gloo, CPU), run together in one launch per test session.

A torchrun launch costs about ten seconds of process start and imports on this machine before any
work, so every 2-rank run that needs no launch of its own (signals, hangs and crashes do) is a
*scenario* here: a builder returns the worker function of ``tests/rank_worker.py`` and its arguments.
The first test that asks for any scenario (the ``two_ranks`` fixture) launches all of them; each test
then checks its own scenario's records against its 1-rank reference run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from helpers import workspace

WORKER = Path(__file__).with_name("rank_worker.py")
STEPS = 4

SCENARIOS: dict[str, Callable[[Path], tuple[str, list]]] = {}
"""Scenario name -> builder(its folder) -> (worker function, arguments)."""


def scenario(name: str):
    def register(builder):
        SCENARIOS[name] = builder
        return builder
    return register


def overrides(*extra: str, kinds: tuple[str, ...] = ("sft", "dpo")) -> list[str]:
    """A 4-step run that checkpoints at step 2 (tests/test_distributed.py's equivalence runs)."""
    ws = workspace()
    data = {"sft": ws / "sft.jsonl", "dpo": ws / "pref.jsonl", "kd": ws / "copy.jsonl", "kto": ws / "pref.jsonl"}
    base = [f"model.path={ws / 'model'}", "train.progress=false", f"train.max_steps={STEPS}",
            "train.save_steps=2", "train.batch_size=8", "train.micro_batch_size=4", "optim.lr=1e-3"]
    for i, k in enumerate(kinds):
        base += [f"objectives.{i}.kind={k}", f"objectives.{i}.data.path={data[k]}", f"objectives.{i}.data.max_len=64"]
        if k == "kd":
            base.append(f"objectives.{i}.teacher={ws / 'teacher'}")
    return base + list(extra)


# ---------------------------------------------------------------- the scenarios
DDP_ALRIGHT = ("schedule.name=alright", "model.lora.rank=4")
FSDP2_MAXRIGHT = ("schedule.name=maxright", "schedule.max_eval_steps=2", "objectives.0.data.eval_fraction=0.125",
                  "objectives.0.data.max_eval_samples=5", "train.eval_batch_size=2")


@scenario("ddp_alright_lora")
def _(out):
    return "train_and_resume", [overrides(*DDP_ALRIGHT, kinds=("sft", "dpo", "kto"))]


@scenario("fsdp2_maxright")
def _(out):
    return "train_and_resume", [overrides(*FSDP2_MAXRIGHT, kinds=("sft", "dpo", "kd")) + ["dist.backend=fsdp2"]]


@scenario("ddp_uneven")
def _(out):
    from test_reliability import base, cached_dpo

    return "runs", [[["full", base()], ["lora", base("model.lora.rank=4", *cached_dpo())]]]


@scenario("fsdp2_uneven")
def _(out):
    from test_reliability import base, cached_dpo

    return "runs", [[["run", base("dist.backend=fsdp2", *cached_dpo())]]]


@scenario("selector")
def _(out):
    from test_selector import DIST_OVERRIDES, selector_args

    return "selector", [selector_args(out / "unused", *DIST_OVERRIDES)]


@scenario("fsdp2_evaluation")
def _(out):
    from test_evaluation import evaluation_args, task_yaml

    return "evaluate", [evaluation_args(task_yaml(out / "task")) + ["dist.backend=fsdp2"]]


@scenario("grpo")
def _(out):
    from test_grpo_kind import two_rank_args

    return "grpo", [two_rank_args()]


# ---------------------------------------------------------------- the launch
def _torchrun(root: Path, specs: list[dict], env: dict | None = None) -> str:
    (root / "specs.json").write_text(json.dumps(specs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(root), str(root / "specs.json")]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, capture_output=True,
                          text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-8000:]
    return output


def _records(root: Path, name: str, output: str = "") -> list[dict]:
    ranks = [json.loads((root / name / f"rank-{r}.json").read_text()) for r in range(2)]
    for r, rec in enumerate(ranks):
        assert "error" not in rec, f"scenario {name} failed on rank {r}:\n{rec['error']}\n{output[-3000:]}"
    return ranks


def launch_one(root: Path, fn: str, args: list, env: dict | None = None) -> list[dict]:
    """One worker function on 2 ranks in a launch of its own (e.g. another engine's environment)."""
    root.mkdir(parents=True, exist_ok=True)
    output = _torchrun(root, [{"name": "run", "fn": fn, "args": args}], env)
    return _records(root, "run", output)


class TwoRanks:
    """The records of every scenario (``two_ranks(name)`` -> ``[rank 0's, rank 1's]``), launched once."""

    def __init__(self, root: Path):
        self.root = root
        self.launched = False
        self.output = ""

    def __call__(self, name: str) -> list[dict]:
        if not self.launched:
            self.launched = True
            specs = []
            for scenario_name, builder in SCENARIOS.items():
                fn, args = builder(self.root / scenario_name)
                specs.append({"name": scenario_name, "fn": fn, "args": args})
            self.output = _torchrun(self.root, specs)
        return _records(self.root, name, self.output)

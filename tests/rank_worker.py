"""One rank of the suite's 2-rank scenarios (launched by tests/two_ranks.py with torchrun, gloo, CPU).

``python -m torch.distributed.run --nproc_per_node 2 tests/rank_worker.py ROOT SPECS`` runs every
scenario of the JSON list SPECS (``{"name", "fn", "args"}``) in this one process: ``fn`` is a function
of this module called with ``(ROOT/<name>, *args)``; it returns this rank's record, written to
``ROOT/<name>/rank-<r>.json`` (``{"error": traceback}`` when it raised). A launch costs about ten
seconds of process start and imports, so the suite pays it once. Every scenario builds its own
engine (and resets it at the end), as separate launches would.
"""

from __future__ import annotations

import json
import shutil
import sys
import traceback
from datetime import timedelta
from pathlib import Path

COLLECTIVES = ("all_reduce", "broadcast", "_broadcast_coalesced", "barrier", "all_gather", "all_gather_into_tensor",
               "reduce_scatter_tensor", "all_gather_object", "broadcast_object_list", "reduce", "gather", "scatter",
               "all_to_all_single")

LEDGER: list[str] = []
"""The name of every collective called through ``torch.distributed`` since the last clear, in order (DDP,
FSDP2, accelerate and bipost call them there). NCCL needs that sequence to be the same on every rank;
gloo lets some mismatches pass (a broadcast from rank 0 returns at once), so tests compare it."""


def record_collectives() -> None:
    import torch.distributed as dist

    def spy(name, fn):
        def call(*args, **kwargs):
            LEDGER.append(name)
            return fn(*args, **kwargs)
        return call

    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, spy(name, getattr(dist, name)))


# ---------------------------------------------------------------- scenarios
def train_and_resume(out: Path, overrides: list[str]) -> dict:
    """Train the run (it must save a checkpoint at ``train.save_steps``) into ``out/full``, then resume a
    copy of its first checkpoint in ``out/resumed`` with the same (reset) engine: the backend, per-step
    losses and objectives, evaluations, the example indices of every objective's first micro-batch, and
    the resumed run's losses."""
    from bipost.configio import load_config
    from bipost.engine import Engine
    from bipost.run import build_trainer
    from bipost.train import checkpoint as ckpt

    cfg = load_config(overrides=overrides + [f"train.output_dir={out / 'full'}"])
    engine = Engine.for_run(cfg)
    trainer = build_trainer(cfg, engine)
    first = {n: r.stream.indices(0) for n, r in trainer.runs.items()}
    full = trainer.train()
    saved = ckpt.list_complete(out / "full")[0]
    resumed_dir = out / "resumed"
    if engine.is_main:
        shutil.copytree(saved, ckpt.checkpoint_dir(resumed_dir) / saved.name)
    engine.barrier()
    cfg.train.output_dir, cfg.train.resume = str(resumed_dir), "true"
    engine.reset()
    resumed = build_trainer(cfg, engine).train()
    engine.reset()
    return {"rank": engine.rank, "world_size": engine.world_size, "backend": engine.backend,
            "wrapper": type(trainer.model).__name__, "train": full.train_losses, "eval": full.eval_history,
            "first_indices": first, "resumed_from": saved.name, "resumed": resumed.train_losses}


def runs(out: Path, specs: list) -> dict:
    """``specs`` (``[name, overrides]``) trained one after another into ``out/<name>``: each run's backend,
    per-step losses, evaluations and the collectives this rank issued."""
    from bipost.configio import load_config
    from bipost.engine import Engine
    from bipost.run import build_trainer

    record: dict = {}
    for name, overrides in specs:
        LEDGER.clear()
        cfg = load_config(overrides=overrides + [f"train.output_dir={out / name}"])
        engine = Engine.for_run(cfg)
        result = build_trainer(cfg, engine).train()
        record[name] = {"backend": engine.backend, "train": result.train_losses, "eval": result.eval_history,
                        "collectives": list(LEDGER)}
        engine.reset()
    return record


def selector(out: Path, overrides: list[str]) -> dict:
    """A bilevel selection run: the selector's logits and the per-step losses this rank saw."""
    from bipost.configio import load_config
    from bipost.engine import Engine
    from bipost.run import build_trainer

    cfg = load_config(overrides=overrides + [f"train.output_dir={out / 'run'}"])
    engine = Engine.for_run(cfg)
    trainer = build_trainer(cfg, engine)
    result = trainer.train()
    engine.reset()
    return {"logits": trainer.hooks[0].weights.logits.detach().tolist(), "train": result.train_losses}


def evaluate(out: Path, overrides: list[str]) -> dict:
    """A run with an ``eval`` section: this rank's evaluations (losses, generation metrics, benchmarks)."""
    from bipost.configio import load_config
    from bipost.engine import Engine
    from bipost.run import build_trainer

    cfg = load_config(overrides=overrides + [f"train.output_dir={out / 'run'}"])
    engine = Engine.for_run(cfg)
    result = build_trainer(cfg, engine).train()
    engine.reset()
    return {"rank": engine.rank, "backend": engine.backend, "lockstep": engine.lockstep_forwards,
            "eval": result.eval_history}


def grpo(out: Path, overrides: list[str]) -> dict:
    """A grpo run trained and resumed (``train_and_resume``) with rank 0's step metrics, then the same
    run with a reward function that fails on rank 1 only: the error each rank raised."""
    import os

    from bipost.configio import load_config
    from bipost.engine import Engine
    from bipost.run import build_trainer
    from bipost.train.metrics import read_metrics

    record = train_and_resume(out, overrides)
    metrics = out / "full" / "metrics.jsonl"
    record["metrics"] = [r for r in read_metrics(metrics) if r.get("kind", "train") == "train"] if metrics.exists() else []
    cfg = load_config(overrides=overrides + [f"train.output_dir={out / 'failing'}", "train.save_steps=0",
                                             "objectives.0.rewards.1.function=helpers:failing_reward"])
    engine = Engine.for_run(cfg)
    os.environ["FAIL_RANK"] = "1"
    try:
        build_trainer(cfg, engine).train()
        record["failing"] = None
    except Exception as e:  # noqa: BLE001 - recorded for the test
        record["failing"] = f"{type(e).__name__}: {e}"
    finally:
        del os.environ["FAIL_RANK"]
        engine.reset()
    return record


# ---------------------------------------------------------------- the launch
def main(root: Path, specs: list[dict]) -> None:
    import torch
    import torch.distributed as dist

    from bipost.cli.common import setup_process

    setup_process()
    torch.set_num_threads(1)
    # One process group for every scenario, with a short timeout: a scenario that fails on one rank
    # only fails the other's next collective within a minute instead of the default ten.
    dist.init_process_group("gloo", timeout=timedelta(seconds=90))
    record_collectives()
    rank = dist.get_rank()
    for spec in specs:
        out = root / spec["name"]
        out.mkdir(parents=True, exist_ok=True)
        try:
            record = globals()[spec["fn"]](out, *spec["args"])
        except Exception:
            record = {"error": traceback.format_exc()}
        (out / f"rank-{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    from bipost.cli.common import finish_distributed

    main(Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()))
    finish_distributed(0)

"""One rank of tests/test_grpo_kind.py's 2-rank test (torchrun, gloo on CPU), all cases in one launch.

``python -m torch.distributed.run --nproc_per_node 2 tests/grpo_dist_worker.py OUT key=value ...``:

1. trains the grpo run the overrides describe into ``OUT/full`` (it saves a checkpoint at
   ``train.save_steps``), then resumes a copy of that checkpoint in ``OUT/resumed`` with the same
   (reset) engine;
2. trains it again with a reward function that fails on rank 1 only (``FAIL_RANK=1``) and records
   the error each rank raised (neither may wait for the other until the collective timeout);

and writes what each rank saw to ``OUT/rank-<r>.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path


def main(out: Path, overrides: list[str]) -> None:
    from bipost.cli.common import setup_process
    from bipost.configio import load_config
    from bipost.engine import Engine
    from bipost.run import build_trainer
    from bipost.train import checkpoint as ckpt
    from bipost.train.metrics import read_metrics

    setup_process()
    cfg = load_config(overrides=overrides + [f"train.output_dir={out / 'full'}"])
    engine = Engine.for_run(cfg)
    trainer = build_trainer(cfg, engine)
    first = trainer.runs["grpo"].stream.indices(0)
    full = trainer.train()
    metrics = [r for r in read_metrics(out / "full" / "metrics.jsonl") if r.get("kind", "train") == "train"] \
        if engine.is_main else []

    saved = ckpt.list_complete(out / "full")[0]
    if engine.is_main:
        shutil.copytree(saved, ckpt.checkpoint_dir(out / "resumed") / saved.name)
    engine.barrier()
    cfg.train.output_dir, cfg.train.resume = str(out / "resumed"), True
    engine.reset()
    resumed = build_trainer(cfg, engine).train()

    os.environ["FAIL_RANK"] = "1"
    failing = load_config(overrides=overrides + [f"train.output_dir={out / 'failing'}", "train.save_steps=0",
                                                 "objectives.0.rewards.1.function=helpers:failing_reward"])
    engine.reset()
    error = None
    try:
        build_trainer(failing, engine).train()
    except Exception as e:  # noqa: BLE001 - recorded for the test
        error = f"{type(e).__name__}: {e}"

    record = {"rank": engine.rank, "backend": engine.backend, "first_indices": first,
              "train": full.train_losses, "eval": full.eval_history, "metrics": metrics,
              "resumed_from": saved.name, "resumed": resumed.train_losses, "failing": error}
    (out / f"rank-{engine.rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    from bipost.cli.common import finish_distributed

    main(Path(sys.argv[1]), sys.argv[2:])
    finish_distributed(0)

"""One rank of a multi-process test run (launched by tests/test_distributed.py with torchrun).

``python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py OUT key=value ...`` trains
the run the overrides describe into ``OUT/full`` (it must save a checkpoint at ``train.save_steps``),
then resumes a copy of that checkpoint in ``OUT/resumed`` with the same (reset) engine, and writes what each
rank saw to ``OUT/rank-<r>.json``: its backend, per-step losses and objectives, evaluations, the
example indices of every objective's first micro-batch, and the resumed run's losses.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def main(out: Path, overrides: list[str]) -> None:
    from bipost.cli.common import setup_process
    from bipost.configio import load_config
    from bipost.train import checkpoint as ckpt
    from bipost.engine import Engine
    from bipost.run import build_trainer

    setup_process()
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
    cfg.train.output_dir, cfg.train.resume = str(resumed_dir), True
    engine.reset()
    resumed = build_trainer(cfg, engine).train()

    record = {
        "rank": engine.rank, "world_size": engine.world_size, "backend": engine.backend,
        "wrapper": type(trainer.model).__name__,
        "train": full.train_losses, "eval": full.eval_history, "first_indices": first,
        "resumed_from": saved.name, "resumed": resumed.train_losses,
    }
    (out / f"rank-{engine.rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    from bipost.cli.common import finish_distributed

    main(Path(sys.argv[1]), sys.argv[2:])
    finish_distributed(0)

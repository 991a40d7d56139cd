"""One rank of tests/test_reliability.py's multi-process runs (launched with torchrun).

``python -m torch.distributed.run --nproc_per_node 2 tests/reliability_worker.py OUT MODE RUNS``

* ``MODE=runs``: ``RUNS`` is a JSON list of ``[name, [key=value, ...]]``; each run trains into
  ``OUT/<name>`` with one engine (reset between runs, as a long-lived process would), and
  ``OUT/rank-<r>.json`` records every run's per-step losses and evaluations as this rank saw them,
  and the sequence of collectives it issued. NCCL needs that sequence to be the same on every rank;
  gloo lets some mismatches pass (a broadcast from rank 0 returns at once), so the test compares it.
* ``MODE=stall``: ``RUNS`` is ``[[name, [key=value, ...]], rank, step, seconds]``: that rank hangs right
  after optimizer step ``step`` for ``seconds`` or until a signal reaches it (torchrun's SIGTERM once
  another rank failed), the others go on; every rank ends through ``run_guarded`` (a collective that
  fails or times out exits with code 5).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


COLLECTIVES = ("all_reduce", "broadcast", "_broadcast_coalesced", "barrier", "all_gather", "all_gather_into_tensor",
               "reduce_scatter_tensor", "all_gather_object", "broadcast_object_list", "reduce", "gather", "scatter",
               "all_to_all_single")


def record_collectives() -> list[str]:
    """From now on, the name of every collective called through ``torch.distributed``, in order (DDP,
    FSDP2, accelerate and bipost call them there)."""
    import torch.distributed as dist

    ledger: list[str] = []

    def spy(name, fn):
        def call(*args, **kwargs):
            ledger.append(name)
            return fn(*args, **kwargs)
        return call

    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, spy(name, getattr(dist, name)))
    return ledger


def runs(out: Path, specs: list) -> None:
    from bipost.configio import load_config
    from bipost.engine import Engine
    from bipost.train.loop import Trainer

    engine = None
    record: dict = {}
    ledger = record_collectives()
    for name, overrides in specs:
        ledger.clear()
        cfg = load_config(overrides=overrides + [f"train.output_dir={out / name}"])
        if engine is None:
            engine = Engine.for_run(cfg)
        else:
            engine.reset()
        trainer = Trainer(cfg, engine)
        result = trainer.train()
        record[name] = {"backend": engine.backend, "train": result.train_losses, "eval": result.eval_history,
                        "collectives": list(ledger)}
    (out / f"rank-{engine.rank}.json").write_text(json.dumps(record))  # type: ignore[union-attr]


def stall(out: Path, spec: list) -> None:
    from bipost.cli.common import run_guarded
    from bipost.configio import load_config
    from bipost.engine import Engine
    from bipost.train.hooks import StepHook
    from bipost.train.loop import Trainer

    (name, overrides), rank, at_step, seconds = spec

    class Stall(StepHook):
        def after_step(self, step: int) -> dict:
            if self.trainer.engine.rank == rank and step + 1 == at_step:
                deadline = time.time() + seconds
                while time.time() < deadline and self.trainer.signals.received is None:
                    time.sleep(0.05)
            return {}

    def run() -> int:
        cfg = load_config(overrides=overrides + [f"train.output_dir={out / name}"])
        hook = Stall()
        hook.trainer = Trainer(cfg, Engine.for_run(cfg), hooks=(hook,))  # the stall watches its signal flag
        hook.trainer.train()
        return 0

    sys.exit(run_guarded("worker", run))


if __name__ == "__main__":
    from bipost.cli.common import finish_distributed, setup_process

    setup_process()
    out, mode, spec = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    {"runs": runs, "stall": stall}[mode](out, spec)
    finish_distributed(0)

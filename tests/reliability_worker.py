"""One rank of tests/test_reliability.py's hung-rank run (launched with torchrun; its other 2-rank
runs are scenarios of tests/two_ranks.py).

``python -m torch.distributed.run --nproc_per_node 2 tests/reliability_worker.py OUT stall SPEC``:
``SPEC`` is ``[[name, [key=value, ...]], rank, step, seconds]``: that rank hangs right after optimizer
step ``step`` for ``seconds`` or until a signal reaches it (torchrun's SIGTERM once another rank
failed), the others go on; every rank ends through ``run_guarded`` (a collective that fails or times
out exits with code 5).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


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
    assert mode == "stall", mode
    stall(out, spec)
    finish_distributed(0)

"""One rank of tests/test_evaluation.py's two-rank evaluation test (torchrun, gloo, CPU).

``python -m torch.distributed.run --nproc_per_node 2 tests/eval_dist_worker.py OUT key=value ...``
trains the run the overrides describe (with an ``eval`` section) into ``OUT/run`` and writes this
rank's evaluations (losses, generation metrics, benchmark scores) to ``OUT/rank-<r>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(out: Path, overrides: list[str]) -> None:
    from bipost.cli.common import setup_process
    from bipost.configio import load_config
    from bipost.engine import Engine
    from bipost.run import build_trainer

    setup_process()
    cfg = load_config(overrides=overrides + [f"train.output_dir={out / 'run'}"])
    engine = Engine.for_run(cfg)
    result = build_trainer(cfg, engine).train()
    record = {"rank": engine.rank, "backend": engine.backend, "lockstep": engine.lockstep_forwards,
              "eval": result.eval_history}
    (out / f"rank-{engine.rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    from bipost.cli.common import finish_distributed

    main(Path(sys.argv[1]), sys.argv[2:])
    finish_distributed(0)

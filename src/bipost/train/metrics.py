"""Metric sinks: metrics.jsonl always; tensorboard / wandb when installed and asked for."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("bipost")


class MetricsWriter:
    def __init__(self, output_dir: str | Path, report_to: list[str], config: dict, enabled: bool,
                 wandb_project: str = "bipost"):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        self._repair()
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            except ImportError:
                log.warning("report_to: tensorboard is not installed (pip install 'bipost[tensorboard]'); skipping")
        if "wandb" in report_to:
            try:
                import wandb

                self.wandb = wandb.init(project=wandb_project, config=config, dir=str(output_dir))
            except ImportError:
                log.warning("report_to: wandb is not installed (pip install 'bipost[wandb]'); skipping")

    def _repair(self) -> None:
        """Drop a torn last line left by a process killed mid-write, so that appending after a
        resume starts on a fresh line."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            self.path.write_bytes(data[: data.rfind(b"\n") + 1])

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl; after a resume, a re-run step replaces the earlier record.
    A torn last line (the writer was killed mid-write) is ignored."""
    by_key: dict[tuple, dict] = {}
    order: list[tuple] = []
    text = Path(path).read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines = lines[:-1]
    for line in lines:
        if not line.strip():
            continue
        rec = json.loads(line)
        key = (rec.get("kind", "train"), rec.get("step"))
        if key not in by_key:
            order.append(key)
        by_key[key] = rec
    return [by_key[k] for k in order]

"""Metric sinks: metrics.jsonl always; tensorboard / wandb / mlflow / trackio when installed and asked for.

Every record's numbers go to every sink at the record's step. A resumed run continues the same
wandb, mlflow and trackio runs: :meth:`MetricsWriter.run_ids` is saved in every checkpoint and
handed back on resume.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("bipost")


def _missing(sink: str, package: str) -> None:
    log.warning("report_to: %s is not installed (pip install %s); skipping", sink, package)


class _Tensorboard:
    name = "tensorboard"

    def __init__(self, output_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    name = "wandb"

    def __init__(self, output_dir: Path, project: str, run_name: str | None, config: dict, run_id: Any):
        import wandb

        # The name only when given: wandb's own default (WANDB_NAME or a generated name) otherwise.
        self.run = wandb.init(project=project, config=config, dir=str(output_dir), id=run_id,
                              resume="must" if run_id else None, **({"name": run_name} if run_name else {}))
        self.id = self.run.id

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def table(self, key: str, rows: list[dict], step: int) -> None:
        import wandb

        columns = list(rows[0]) if rows else []
        self.run.log({key: wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])}, step=step)

    def close(self) -> None:
        self.run.finish()


class _Mlflow:
    """Through an explicit ``MlflowClient`` (no global active run, so several runs in one process,
    as ``bipost compare`` makes, do not interfere)."""

    name = "mlflow"

    def __init__(self, uri: str | None, experiment: str, run_name: str, config: dict, run_id: Any):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            self.id = run_id
        else:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
            self.id = self.client.create_run(exp_id, run_name=run_name).info.run_id
            self.client.log_dict(self.id, config, "config.json")

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # mlflow stores NaN but rejects inf; a metric of nothing is NaN anyway.
        metrics = [Metric(k, v if math.isfinite(v) else math.nan, now, step) for k, v in scalars.items()]
        self.client.log_batch(self.id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.id)


class _Trackio:
    name = "trackio"

    def __init__(self, project: str, run_name: str, config: dict, run_id: Any):
        import trackio

        # The system-metrics threads would keep logging between bipost's own records.
        self.run = trackio.init(project=project, name=run_id or run_name, config=config,
                                resume="must" if run_id else "never", auto_log_cpu=False, auto_log_gpu=False)
        self.id = self.run.name

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsWriter:
    """Writes records to metrics.jsonl and the sinks in ``report_to`` (on the main rank only:
    ``enabled``). ``run_ids`` (from a checkpoint) continues those trackers' runs."""

    def __init__(self, output_dir: str | Path, report_to: list[str], config: dict, enabled: bool,
                 wandb_project: str = "bipost", run_name: str | None = None, run_ids: dict | None = None,
                 mlflow_tracking_uri: str | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.sinks: list[Any] = []
        if not enabled:
            return
        self._repair()
        out, ids, name = Path(output_dir), run_ids or {}, run_name or Path(output_dir).resolve().name
        makers = {
            "tensorboard": (lambda: _Tensorboard(out), "'bipost[tensorboard]'"),
            "wandb": (lambda: _Wandb(out, wandb_project, run_name, config, ids.get("wandb")), "'bipost[wandb]'"),
            "mlflow": (lambda: _Mlflow(mlflow_tracking_uri, wandb_project, name, config, ids.get("mlflow")),
                       "'bipost[mlflow]'"),
            "trackio": (lambda: _Trackio(wandb_project, name, config, ids.get("trackio")), "'bipost[trackio]'"),
        }
        for sink in report_to:
            make, package = makers[sink]
            try:
                self.sinks.append(make())
            except ImportError:
                _missing(sink, package)

    @classmethod
    def for_run(cls, cfg, enabled: bool, run_ids: dict | None = None) -> "MetricsWriter":
        """The writer of a run config (``train.report_to`` and the trackers' settings)."""
        import dataclasses

        t = cfg.train
        return cls(t.output_dir, t.report_to, dataclasses.asdict(cfg), enabled, wandb_project=t.wandb_project,
                   run_name=t.run_name, run_ids=run_ids, mlflow_tracking_uri=t.mlflow_tracking_uri)

    def run_ids(self) -> dict[str, Any]:
        """The trackers' run ids (kept in checkpoints, so a resumed run continues those runs)."""
        return {s.name: s.id for s in self.sinks if hasattr(s, "id")}

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
        scalars = {k: float(v) for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        for sink in self.sinks:
            sink.log(scalars, step)

    def table(self, key: str, rows: list[dict], step: int) -> None:
        """``rows`` as a table in the sinks that show tables (wandb)."""
        if not self.enabled:
            return
        for sink in self.sinks:
            if hasattr(sink, "table"):
                sink.table(key, rows, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


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

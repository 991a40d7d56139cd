"""Resuming a run: which checkpoint, and whether this run may continue it.

* ``train.resume``: ``false`` (a fresh run; a folder holding checkpoints is an error), ``true`` (resume;
  nothing to resume is an error) or ``auto`` (resume if there is a checkpoint, else start fresh: what a
  requeued job runs).
* Every file of a checkpoint is checked against the manifest its ``COMPLETE`` marker holds (a file
  truncated by a full disk or a copy cut short has the wrong size); a damaged checkpoint, or one that
  fails to load, is reported and the previous complete one is used.
* Resuming with settings that change the run's trajectory (objectives, data, batch sizes, world size,
  seed, schedule, optimizer, model) is a :class:`ResumeError` listing every difference, unless
  ``train.resume_allow_changes`` names them; the step budget, logging, evaluation and saving settings
  (:data:`FREE_TO_CHANGE`) may change freely.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
from pathlib import Path
from typing import Any

from bipost.config import ConfigError
from bipost.configio import canonical_objective
from bipost.train.checkpoint import MARKER, SETTINGS, checkpoint_dir, list_complete, load_checkpoint

log = logging.getLogger("bipost")


class CheckpointLoadError(RuntimeError):
    """No complete checkpoint of the run could be loaded."""


class ResumeError(ConfigError):
    """A resume that cannot proceed as asked (nothing to resume, other settings, another engine)."""


def resume_mode(value: Any) -> str:
    """``train.resume`` as ``"false" | "true" | "auto"`` (also from a bool set in code)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).strip().lower()


def verify_checkpoint(path: Path) -> list[str]:
    """Problems of a complete checkpoint's files against its manifest (empty: it looks whole).
    Checkpoints written before manifests existed (``COMPLETE`` without ``files``) pass."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError) as err:
        return [f"its {MARKER} marker is unreadable ({err})"]
    files = marker.get("files") if isinstance(marker, dict) else None
    if files is None:
        return []
    problems = []
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            problems.append(f"{rel} is missing")
        elif f.stat().st_size != size:
            problems.append(f"{rel} has {f.stat().st_size} bytes, {size} were written")
    return problems


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: obj}


FREE_TO_CHANGE = (
    "train.output_dir", "train.max_steps", "train.epochs", "train.eval_steps", "train.eval_batch_size",
    "train.save_steps", "train.keep_last", "train.resume", "train.resume_allow_changes", "train.logging_steps",
    "train.report_to", "train.wandb_project", "train.progress", "train.early_stop_eps", "train.ref_pareto",
    "train.prefetch", "train.cache_dir", "train.save_on_signals", "train.max_skipped_steps", "train.packing",
    "train.logits", "train.logits_chunk_size",
    "model.compile", "model.gradient_checkpointing", "model.attn_implementation", "model.trust_remote_code",
    "model.lora.save_merged", "dist.*",
    "objectives.*.data.max_eval_samples", "objectives.*.cache_reference", "objectives.*.cache_teacher",
    "selector.every_epochs", "selector.save_epoch_models", "selector.summary_rows", "selector.formats",
    "selector.name", "eval.*", "train.run_name", "train.mlflow_tracking_uri", "objectives.*.data.cache_dir",
    "objectives.*.data.num_proc",
)
"""Settings that do not change which updates a run makes (budget, logging, evaluation, saving, speed and
memory knobs whose numerics match, the engine: a checkpoint another engine cannot load fails on its own)."""


def run_settings(cfg, world_size: int, max_steps: int) -> dict:
    """What a checkpoint records of the run that wrote it (``settings.json``)."""
    return {"config": dataclasses.asdict(cfg), "world_size": world_size, "max_steps": max_steps}


def _canonical(config: dict) -> dict:
    """A saved config with each objective's fields under their current names (a checkpoint written
    before a field was renamed saved it under what is now an alias, ``ObjectiveConfig.aliases``)."""
    objectives = config.get("objectives")
    if not isinstance(objectives, list):
        return config
    return {**config, "objectives": [canonical_objective(o) if isinstance(o, dict) else o for o in objectives]}


def settings_diff(saved: dict, current: dict, allowed: list[str] = ()) -> list[str]:
    """Trajectory-changing differences between a checkpoint's :func:`run_settings` and this run's,
    as ``key: old -> new`` lines; ``allowed`` names keys (or prefixes of keys) to accept."""
    a = {**_flatten(_canonical(saved.get("config", {}))), "world_size": saved.get("world_size")}
    b = {**_flatten(_canonical(current.get("config", {}))), "world_size": current.get("world_size")}
    missing = object()
    lines = []
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key, missing), b.get(key, missing)
        if old == new or any(fnmatch.fnmatchcase(key, p) for p in FREE_TO_CHANGE):
            continue
        if any(key == p or key.startswith(p + ".") or fnmatch.fnmatchcase(key, p) for p in allowed):
            continue
        lines.append(f"{key}: {'(unset)' if old is missing else repr(old)} -> {'(unset)' if new is missing else repr(new)}")
    return lines


def _check_resumable(path: Path, engine, settings: dict) -> str | None:
    """Why ``path`` cannot be resumed by this run (None: it can); read on the main rank."""
    sharded = (path / "sharded").is_dir()
    if sharded != engine.shards_optimizer:
        return (f"{path} was written {'with' if sharded else 'without'} sharded optimizer states; resume it with "
                f"{'FSDP2 / DeepSpeed' if sharded else 'one device or DDP'} (this run uses {engine.backend})")
    try:
        saved = json.loads((path / SETTINGS).read_text())
    except FileNotFoundError:
        log.warning("%s records no settings (written by an older bipost): they are not compared", path)
        return None
    allowed = settings["config"]["train"].get("resume_allow_changes", [])
    diff = settings_diff(saved, settings, allowed)
    if diff:
        return (f"resuming {path} with settings that change the run's trajectory:\n  " + "\n  ".join(diff)
                + f"\nUse the checkpoint's settings, or accept these with train.resume_allow_changes="
                  f"{','.join(sorted({d.split(':')[0] for d in diff}))}")
    step = json.loads((path / MARKER).read_text()).get("step", 0)
    if settings["max_steps"] < step:
        return (f"{path} is at step {step}, past this run's step budget of {settings['max_steps']} "
                f"(train.max_steps / train.epochs)")
    if saved.get("max_steps") not in (None, settings["max_steps"]):
        engine.print(f"[resume] the step budget changed from {saved['max_steps']} to {settings['max_steps']}: the "
                     f"LR schedule (and a sequential schedule's switch) follow the new budget")
    return None


def prepare_output_dir(output_dir: str | Path, cfg, engine) -> None:
    """Create the run directory for a fresh run or a resume (``train.resume``), on every rank: the
    main rank decides, and every rank raises the same error if the run cannot start."""
    import yaml

    out = Path(output_dir)
    mode = resume_mode(cfg.train.resume)
    problem: BaseException | None = None
    if engine.is_main:
        existing = list_complete(out)
        if existing and mode == "false":
            problem = FileExistsError(
                f"{out} already holds checkpoints ({existing[-1].name}); pass train.resume=true (or auto) to "
                f"continue that run, or choose another train.output_dir")
        elif not existing and mode == "true":
            problem = ResumeError(f"train.resume=true, but {out} holds no complete checkpoint to resume; use "
                                  f"train.resume=auto to start fresh when there is none")
        else:
            out.mkdir(parents=True, exist_ok=True)
            if not existing and (out / "metrics.jsonl").exists():  # a fresh start: no stale records
                (out / "metrics.jsonl").unlink()
            (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    problem = engine.broadcast_object(problem)
    if problem is not None:
        raise problem
    engine.barrier()


def resume(output_dir: str | Path, engine, model, optimizer, scheduler, settings: dict) -> dict | None:
    """Restore the latest usable complete checkpoint of ``output_dir`` (``train.resume`` true / auto,
    read from ``settings``); its trainer state (with ``path``), or None for a fresh start.

    Damaged checkpoints (files that do not match the manifest, or that fail to load) are reported
    and the previous complete one is used. Every rank calls it."""
    mode = resume_mode(settings["config"]["train"]["resume"])
    if mode == "false":
        return None
    with engine.stage("resume"):
        report = None
        if engine.is_main:
            usable, damaged = [], []
            for path in reversed(list_complete(output_dir)):
                problems = verify_checkpoint(path)
                if problems:
                    damaged.append(f"{path.name} ({'; '.join(problems)})")
                else:
                    usable.append(str(path))
            report = (usable, damaged)
        usable, damaged = engine.broadcast_object(report)
        for d in damaged:
            engine.print(f"[resume] checkpoint {d} is damaged; using an earlier one")
        if not usable:
            if damaged:
                raise CheckpointLoadError(f"no usable checkpoint in {checkpoint_dir(output_dir)}: "
                                          f"{'; '.join(damaged)}")
            engine.print(f"[resume] no complete checkpoint in {output_dir}; starting from scratch")
            return None
        from bipost.engine import CollectiveError

        failures = []
        for path in map(Path, usable):
            why = engine.broadcast_object(_check_resumable(path, engine, settings) if engine.is_main else None)
            if why:
                raise ResumeError(why)
            error: BaseException | None = None
            try:
                state = load_checkpoint(path, engine, model, optimizer, scheduler)
            except CollectiveError:
                raise
            except Exception as err:  # a damaged file the manifest could not tell
                error = err
            if not engine.any_rank(error is not None):
                engine.print(f"[resume] from {path} (step {state['step']})")
                return {**state, "path": path}
            failures.append(f"{path.name} ({error or 'failed on another rank'})")
            engine.print(f"[resume] checkpoint {failures[-1]} could not be loaded; using an earlier one")
        raise CheckpointLoadError(f"no checkpoint in {checkpoint_dir(output_dir)} could be loaded: "
                                  f"{'; '.join(failures)}")

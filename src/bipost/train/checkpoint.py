"""Atomic, verified, resumable checkpoints.

Layout of ``<output_dir>/checkpoints/step-00000100/``::

    model/            HF format: save_pretrained (LoRA: the peft adapter only), gathered from all ranks
    optimizer.pt      optimizer state (one device / DDP: the same on every rank, written once)
    sharded/          FSDP2 / DeepSpeed instead: trained weights and optimizer states, one file per
                      rank (torch DCP, or DeepSpeed's own checkpoint); resume restores from here
    scheduler.pt      LR scheduler state
    rng-<rank>.pt     python / numpy / torch (CPU and CUDA) RNG states of each rank
    trainer_state.pt  step, every data stream's position, schedule state, counters
    settings.json     the resolved config, world size and step budget it was written under
    COMPLETE          written last: the step and every file's size (the manifest)

A checkpoint is written into a hidden ``.tmp-…`` folder and renamed into place only after
``COMPLETE`` is on disk, so a crash (even SIGKILL) during a save never leaves a folder that looks
complete; leftovers are removed by the next save. Only the last ``keep_last`` are kept.

What can be trusted:

* A checkpoint whose trained weights hold inf / NaN is never written (:class:`NonFiniteError`).
* A save that fails (a full disk: ``ENOSPC``; any rank) is a :class:`CheckpointWriteError` on every
  rank; the half-written folder is removed and the previous checkpoints are untouched.
* On resume (:func:`resume`) every file is checked against the manifest (a file truncated by a full
  disk or a copy cut short has the wrong size); a damaged checkpoint, or one that fails to load,
  is reported and the previous complete one is used.
* Resuming with settings that change the run's trajectory (objectives, data, batch sizes, world
  size, seed, schedule, optimizer, model) is a :class:`ResumeError` listing every difference, unless
  ``train.resume_allow_changes`` names them; the step budget, logging, evaluation and saving
  settings may change freely.
"""

from __future__ import annotations

import dataclasses
import errno
import fnmatch
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from bipost.configio import ConfigError, canonical_objective
from bipost.train.guard import NonFiniteError

log = logging.getLogger("bipost")

PREFIX = "step-"
MARKER = "COMPLETE"
SETTINGS = "settings.json"


class CheckpointWriteError(OSError):
    """A checkpoint (or the final model) could not be written; the previous checkpoints are intact."""


class CheckpointLoadError(RuntimeError):
    """No complete checkpoint of the run could be loaded."""


class ResumeError(ConfigError):
    """A resume that cannot proceed as asked (nothing to resume, other settings, another engine)."""


def resume_mode(value: Any) -> str:
    """``train.resume`` as ``"false" | "true" | "auto"`` (also from a bool set in code)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).strip().lower()


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_complete(output_dir: str | Path) -> list[Path]:
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / MARKER).is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    done = list_complete(output_dir)
    return done[-1] if done else None


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def save_model(engine, model, path: Path, tokenizer=None, merged: bool = False, check_finite: bool = True) -> None:
    """HF-format export from the main rank; every rank calls it (a sharded model is gathered first,
    a LoRA model only its adapter). ``merged`` also writes ``<path>-merged`` with the adapter folded
    into the base weights. Weights holding inf / NaN are refused (``check_finite``); a failed write
    is a :class:`CheckpointWriteError` on every rank."""
    if check_finite:
        refuse_nonfinite(engine, model, f"the model to {path}")
    unwrapped = engine.unwrap(model)
    peft = hasattr(unwrapped, "peft_config")
    state = engine.model_state_dict(model, trainable_only=peft)

    def write() -> None:
        # peft picks the adapter's entries out of the given state dict (and drops the adapter name)
        unwrapped.save_pretrained(path, state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        if merged and peft:
            merged_dir = path.parent / (path.name + "-merged")
            _merged_model(engine, unwrapped, path).save_pretrained(merged_dir, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(merged_dir)

    _agree(engine, _attempt(engine.is_main, write), f"the model to {path}")


def refuse_nonfinite(engine, model, what: str) -> None:
    """Raise :class:`NonFiniteError` (every rank) if any trained weight holds inf / NaN."""
    bad = engine.nonfinite_parameters(model)
    if bad:
        raise NonFiniteError(f"not writing {what}: {len(bad)} trained weight tensor(s) hold inf / NaN "
                             f"({', '.join(bad[:8])}{', ...' if len(bad) > 8 else ''}); the last complete checkpoint "
                             f"is unchanged")


def _attempt(run: bool, fn: Callable[[], None]) -> BaseException | None:
    """``fn()``'s exception (None if it succeeded or did not run): writes fail locally, ranks then agree."""
    if not run:
        return None
    try:
        fn()
    except Exception as err:  # reported through _agree, with the cause chained
        return err
    return None


def _describe(err: BaseException) -> str:
    full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(err) \
        or "StorageFull" in str(err)
    return f"{err}{' (no space left on the device)' if full else ''}"


def _agree(engine, err: BaseException | None, what: str) -> None:
    """Every rank raises :class:`CheckpointWriteError` if writing ``what`` failed on any rank (a collective)."""
    if engine.any_rank(err is not None):
        cause = _describe(err) if err is not None else "another rank failed to write its part (see its error)"
        raise CheckpointWriteError(f"could not write {what}: {cause}") from err


def _merged_model(engine, unwrapped, adapter_dir: Path):
    """The base model with the adapter merged in. A replicated model is merged from a copy; a
    sharded one holds no full weights on any rank, so the base is reloaded on this rank's CPU and
    the adapter just written is applied to it."""
    import copy

    if not engine.shards_parameters:
        return copy.deepcopy(unwrapped).merge_and_unload()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_path = unwrapped.peft_config["default"].base_model_name_or_path
    with engine.local_model_init():
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=unwrapped.get_base_model().config.dtype)
        return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def save_checkpoint(output_dir, step: int, engine, model, optimizer, scheduler, trainer_state: dict,
                    keep_last: int, settings: dict | None = None) -> Path:
    """Write ``checkpoints/step-<step>/`` (every rank calls it); ``settings``: :func:`run_settings`."""
    root = checkpoint_dir(output_dir)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    with engine.stage(f"checkpoint save at step {step}"):
        refuse_nonfinite(engine, model, f"checkpoint {final.name}")

        def start() -> None:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()

        def write_state() -> None:
            torch.save(rng_state(), tmp / f"rng-{engine.rank}.pt")
            if engine.is_main:
                if not engine.shards_optimizer:
                    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
                torch.save(trainer_state, tmp / "trainer_state.pt")
                if settings is not None:
                    (tmp / SETTINGS).write_text(json.dumps(settings, indent=1, default=str))

        def finish() -> None:
            _fsync_tree(tmp)
            files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            _write_synced(tmp / MARKER, json.dumps({"step": step, "files": files}))
            if final.exists():  # a re-save of the same step (e.g. after resume)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)

        previous = latest_checkpoint(output_dir)  # for the message (the output dir is shared by all ranks)
        try:
            _agree(engine, _attempt(engine.is_main, start), f"the folder {tmp}")
            if engine.shards_optimizer:
                engine.save_sharded_state(model, optimizer, tmp / "sharded")
            save_model(engine, model, tmp / "model", check_finite=False)
            _agree(engine, _attempt(True, write_state), f"the training state to {tmp}")
            _agree(engine, _attempt(engine.is_main, finish), f"{final}")
        except Exception as err:  # a write failed (a full disk, ...): on every rank, the same error
            _give_up(engine, tmp, final, previous, err)
        except BaseException as err:  # torch.distributed.checkpoint's CheckpointException
            if type(err).__name__ != "CheckpointException":
                raise
            _give_up(engine, tmp, final, previous, err)
        if engine.is_main:
            for old in list_complete(output_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        engine.barrier()
    return final


def _give_up(engine, tmp: Path, final: Path, previous: Path | None, err: BaseException) -> None:
    from bipost.engine import CollectiveError

    if isinstance(err, CollectiveError):
        raise err
    if engine.is_main:  # free the space the half-written checkpoint took
        shutil.rmtree(tmp, ignore_errors=True)
    cause = str(err) if isinstance(err, CheckpointWriteError) else _describe(err)
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    raise CheckpointWriteError(
        f"checkpoint {final.name} was not written ({cause}); its partial files were removed and {kept}. "
        f"Free space (or fix the cause), then rerun with train.resume=auto") from err


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX: the directory entry is data of the directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not fsync directories
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- verification and resume
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
    "selector.name",
)
"""Settings that do not change which updates a run makes (budget, logging, evaluation, saving, speed and
memory knobs whose numerics match, the engine: a checkpoint another engine cannot load fails on its own)."""


def run_settings(cfg, world_size: int, max_steps: int) -> dict:
    """What a checkpoint records of the run that wrote it (``settings.json``)."""
    return {"config": dataclasses.asdict(cfg), "world_size": world_size, "max_steps": max_steps}


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


def _canonical(config: dict) -> dict:
    """A saved config with each objective's fields under their current names (a checkpoint written
    before a field was renamed saved it under what is now an alias)."""
    objectives = config.get("objectives")
    if not isinstance(objectives, list):
        return config
    return {**config, "objectives": [canonical_objective(o) if isinstance(o, dict) else o for o in objectives]}


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


def load_model_weights(model, model_dir: Path) -> None:
    """Load an HF-format export back into an (unwrapped) model, full or peft."""
    from safetensors.torch import load_file

    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(model_dir / "adapter_model.safetensors"))
        return
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        from transformers.modeling_utils import load_sharded_checkpoint

        load_sharded_checkpoint(model, str(model_dir), strict=False)
        return
    missing, unexpected = model.load_state_dict(load_file(model_dir / "model.safetensors"), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    really_missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if really_missing or unexpected:
        raise RuntimeError(f"checkpoint {model_dir} does not match the model: missing {really_missing}, "
                           f"unexpected {unexpected}")


def load_checkpoint(path: Path, engine, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, LR schedule and this rank's RNG; return the trainer state.
    A checkpoint resumes under the kind of engine that wrote it (sharded or not); FSDP2 ones also
    on another number of ranks."""
    sharded = (path / "sharded").is_dir()
    if sharded != engine.shards_optimizer:
        raise ResumeError(
            f"{path} was written {'with' if sharded else 'without'} sharded optimizer states; resume it with "
            f"{'FSDP2 / DeepSpeed' if sharded else 'one device or DDP'} (this run uses {engine.backend})"
        )
    if sharded:
        engine.load_sharded_state(model, optimizer, path / "sharded")
    else:
        load_model_weights(engine.unwrap(model), path / "model")
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_file = path / f"rng-{engine.rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return torch.load(path / "trainer_state.pt", weights_only=False)

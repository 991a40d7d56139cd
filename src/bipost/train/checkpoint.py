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
* Resuming verifies checkpoints and compares settings: ``train/resume.py``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bipost.train.guard import NonFiniteError

log = logging.getLogger("bipost")

PREFIX = "step-"
MARKER = "COMPLETE"
SETTINGS = "settings.json"


class CheckpointWriteError(OSError):
    """A checkpoint (or the final model) could not be written; the previous checkpoints are intact."""


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
    A checkpoint resumes under the kind of engine that wrote it, sharded or not (``resume`` checks);
    FSDP2 ones also on another number of ranks."""
    if (path / "sharded").is_dir():
        engine.load_sharded_state(model, optimizer, path / "sharded")
    else:
        load_model_weights(engine.unwrap(model), path / "model")
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_file = path / f"rng-{engine.rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return torch.load(path / "trainer_state.pt", weights_only=False)

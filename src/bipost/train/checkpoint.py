"""Atomic, resumable checkpoints.

Layout of ``<output_dir>/checkpoints/step-00000100/``::

    model/            HF format: save_pretrained (LoRA: the peft adapter only), gathered from all ranks
    optimizer.pt      optimizer state (one device / DDP: the same on every rank, written once)
    sharded/          FSDP2 / DeepSpeed instead: trained weights and optimizer states, one file per
                      rank (torch DCP, or DeepSpeed's own checkpoint); resume restores from here
    scheduler.pt      LR scheduler state
    rng-<rank>.pt     python / numpy / torch (CPU and CUDA) RNG states of each rank
    trainer_state.pt  step, every data stream's position, schedule state, counters
    COMPLETE          written last

A checkpoint is written into a hidden ``.tmp-…`` folder and renamed into place only after
``COMPLETE`` is on disk, so a crash (even SIGKILL) during a save never leaves a folder that looks
complete; leftovers are removed by the next save. Only the last ``keep_last`` are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

PREFIX = "step-"
MARKER = "COMPLETE"


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


def save_model(engine, model, path: Path, tokenizer=None, merged: bool = False) -> None:
    """HF-format export from the main rank; every rank calls it (a sharded model is gathered first,
    a LoRA model only its adapter). ``merged`` also writes ``<path>-merged`` with the adapter folded
    into the base weights."""
    unwrapped = engine.unwrap(model)
    peft = hasattr(unwrapped, "peft_config")
    state = engine.model_state_dict(model, trainable_only=peft)
    if engine.is_main:
        # peft picks the adapter's entries out of the given state dict (and drops the adapter name)
        unwrapped.save_pretrained(path, state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        if merged and peft:
            merged_dir = path.parent / (path.name + "-merged")
            _merged_model(engine, unwrapped, path).save_pretrained(merged_dir, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(merged_dir)


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
                    keep_last: int) -> Path:
    root = checkpoint_dir(output_dir)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    if engine.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    engine.barrier()
    torch.save(rng_state(), tmp / f"rng-{engine.rank}.pt")
    save_model(engine, model, tmp / "model")
    if engine.shards_optimizer:
        engine.save_sharded_state(model, optimizer, tmp / "sharded")
    if engine.is_main:
        if not engine.shards_optimizer:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(trainer_state, tmp / "trainer_state.pt")
    engine.barrier()
    if engine.is_main:
        _fsync_tree(tmp)
        (tmp / MARKER).write_text(json.dumps({"step": step}))
        if final.exists():  # a re-save of the same step (e.g. after resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_complete(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    engine.barrier()
    return final


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
        raise ValueError(
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

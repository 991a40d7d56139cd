"""Reference log-probs computed once, cached on disk, and attached to DPO batches.

DPO's reference model is frozen, so its summed response log-probs are a fixed function of each
example. With ``objectives.N.cache_reference`` they are computed in one no-grad pass before
training (train and eval examples), saved to ``<cache_dir>/ref-<objective>.pt``, and the
objective's collate adds them to every batch as ``ref_logps`` (``[2n]``: chosen then rejected,
the layout ``DPOTask.loss`` reads). No reference model stays in memory while training, so an
ALRIGHT/MAXRIGHT step that draws DPO costs one policy forward, like an SFT step.

The cache is keyed by what the values depend on: the examples' token ids (hence the data, its
filtering, ``max_len`` and the tokenizer's output), the reference model's files, the tokenizer
itself, ``max_len`` and the weights dtype. A file whose key differs (or that cannot be read) is
reported and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from bipost.data.types import PrefExample

log = logging.getLogger("bipost")

FORMAT_VERSION = 1


@dataclass
class ReferenceLogps:
    """Summed reference log-probs of chosen and rejected, per example (by content)."""

    table: dict[bytes, tuple[float, float]]
    """``content_key(example)`` -> (chosen, rejected)."""

    @staticmethod
    def content(e: PrefExample) -> tuple:
        """The key: token ids only (row ids of eval splits may repeat training ones)."""
        return (e.prompt_ids, e.chosen_ids, e.rejected_ids)

    @classmethod
    def of(cls, examples: Sequence[PrefExample], values: torch.Tensor) -> "ReferenceLogps":
        return cls({content_key(cls.content(e)): (c, r) for e, (c, r) in zip(examples, values.tolist())})

    def lookup(self, examples: Sequence[PrefExample]) -> torch.Tensor:
        """``[2n]`` float32: the chosen values of ``examples`` then their rejected values."""
        pairs = []
        for e in examples:
            key = content_key(self.content(e))
            if key not in self.table:
                raise KeyError(f"example row {e.row_id} is not in the reference cache")
            pairs.append(self.table[key])
        return torch.tensor([p[0] for p in pairs] + [p[1] for p in pairs], dtype=torch.float32)


# ---------------------------------------------------------------- fingerprints
def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def content_bytes(parts: Sequence) -> bytes:
    """An example's id sequences (tuples or numpy arrays) as bytes: per part its length (4 bytes,
    little-endian) and its ids as native int64 (the bytes ``array("q", part)`` gave)."""
    return b"".join(len(p).to_bytes(4, "little") + np.asarray(p, dtype=np.int64).tobytes() for p in parts)


def content_key(parts: Sequence) -> bytes:
    """A 16-byte digest of :func:`content_bytes`: the table key (a copy of every token would cost
    8 bytes a token; tuples of arrays are not hashable)."""
    return hashlib.blake2b(content_bytes(parts), digest_size=16).digest()


def data_fingerprint(examples: Sequence, content: Callable[[object], tuple] = ReferenceLogps.content) -> str:
    """Hash of every example's token ids (order included); ``content(e)`` names its id sequences."""
    h = hashlib.sha256()
    for e in examples:
        h.update(content_bytes(content(e)))
    return h.hexdigest()


def model_fingerprint(path: str) -> str:
    """The model's files (name, size, mtime) for a local folder or a hub cache snapshot; a
    rewritten or replaced checkpoint gets a new fingerprint."""
    p = Path(path)
    if not p.is_dir():
        try:
            from huggingface_hub import snapshot_download

            p = Path(snapshot_download(path, local_files_only=True))
        except Exception:  # not in the local hub cache: the name is all we know
            return _sha({"name": path})
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in (".safetensors", ".bin", ".json", ".pt"))
    return _sha([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files])


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return hashlib.sha256(backend.to_str().encode()).hexdigest()
    return _sha(sorted(tokenizer.get_vocab().items()))


def cache_meta(examples: Sequence, model: str, tokenizer, max_len: int, dtype: str, role: str = "reference",
               content: Callable[[object], tuple] = ReferenceLogps.content) -> dict:
    """What a cache of ``role`` model (``reference`` or ``teacher``) outputs depends on."""
    return {
        "version": FORMAT_VERSION,
        "examples": len(examples),
        "data": data_fingerprint(examples, content),
        role: model,
        f"{role}_files": model_fingerprint(model),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_len": max_len,
        "dtype": dtype,
    }


# ---------------------------------------------------------------- build / load
def compute_reference_logps(examples: Sequence[PrefExample], logps_fn: Callable[[dict], torch.Tensor],
                            collate: Callable[[list], dict], batch_size: int, to_device: Callable[[dict], dict],
                            rank: int = 0, world_size: int = 1,
                            all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``[N, 2]`` float32 (chosen, rejected) summed reference log-probs, without grad.

    ``logps_fn(batch)`` returns the ``[2n]`` sums of a collated batch. Rank ``r`` of ``W``
    computes examples ``r, r + W, ...``; ``all_reduce_sum`` completes the table on every rank.
    """
    table = torch.zeros(len(examples), 2, dtype=torch.float64)
    mine = list(range(rank, len(examples), world_size))
    with torch.no_grad():
        for s in range(0, len(mine), batch_size):
            idx = mine[s:s + batch_size]
            sums = logps_fn(to_device(collate([examples[i] for i in idx]))).double().cpu()
            n = len(idx)
            table[idx, 0] = sums[:n]
            table[idx, 1] = sums[n:]
    if world_size > 1 and all_reduce_sum is not None:
        table = all_reduce_sum(table).cpu()
    return table.float()


def load_or_build(path: Path, examples: Sequence[PrefExample], meta: dict,
                  build: Callable[[], torch.Tensor], is_main: bool = True,
                  barrier: Callable[[], None] = lambda: None,
                  any_rank: Callable[[bool], bool] = lambda flag: flag) -> ReferenceLogps:
    """The cache at ``path`` if its key matches ``meta``; otherwise ``build()`` it and save it.

    ``build`` runs on every rank (it may be a collective); only the main rank writes the file,
    atomically (a temporary file renamed over the old one). ``any_rank(flag)`` is True on every
    rank if ``flag`` is on any: all ranks rebuild if one must (e.g. one node sees other model
    files), so their collectives match.
    """
    key = _sha(meta)
    saved = read_cache(path, key, meta, "reference")
    values = saved.get("logps") if saved is not None else None
    if values is not None and values.shape != (len(examples), 2):
        log.warning("reference cache %s has %s values for %d examples; rebuilding", path,
                    tuple(values.shape), len(examples))
        values = None
    if any_rank(values is None):
        log.info("computing reference log-probs of %d examples -> %s", len(examples), path)
        values = build()
        if is_main:
            write_cache(path, key, meta, {"logps": values})
        barrier()
    else:
        log.info("reference log-probs of %d examples from %s", len(examples), path)
    return ReferenceLogps.of(examples, values)


def write_cache(path: Path, key: str, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Save atomically: a temporary file renamed over the old one (a killed run leaves no torn cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save({"key": key, "meta": json.dumps(meta, sort_keys=True), **tensors}, tmp)
    os.replace(tmp, path)


def read_cache(path: Path, key: str, meta: dict, what: str) -> dict | None:
    """The saved dict at ``path`` if it reads and its key is ``key``; else None (and why, logged)."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        saved_key, saved_meta = saved["key"], json.loads(saved["meta"])
    except Exception as err:  # truncated or foreign file
        log.warning("%s cache %s is unreadable (%s); rebuilding", what, path, err)
        return None
    if saved_key != key:
        changed = sorted(k for k in set(meta) | set(saved_meta) if meta.get(k) != saved_meta.get(k))
        log.warning("%s cache %s is stale (changed: %s); rebuilding", what, path, ", ".join(changed) or "key")
        return None
    return saved

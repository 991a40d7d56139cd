"""A frozen model's outputs per example, computed once before training, cached on disk, attached to batches.

A DPO reference's summed log-probs and a KD teacher's top-k log-probs are fixed functions of each
example. With ``objectives.N.cache_reference`` / ``cache_teacher`` they are computed in one no-grad
pass over the objective's train and eval examples, saved to ``<cache_dir>/<prefix>-<objective>.pt``,
and the objective's collate attaches them to every batch; the frozen model is never kept in memory
while training. One mechanism serves every kind (:class:`ExampleCache`):

* example ``i`` owns rows ``offsets[i]:offsets[i + 1]`` of every cached tensor (one row per example
  for the reference's ``[chosen, rejected]`` sums; one row per response position, ``k`` wide, for the
  teacher's top-k ids and log-probs);
* examples are found by their token ids (:func:`content_key`), never by row id: an eval split's row
  ids may repeat the training ones;
* the file is keyed by what the values depend on (:func:`cache_meta`): the examples' token ids (hence
  the data, its filtering, ``max_len`` and the tokenizer's output), the frozen model's files, the
  tokenizer, ``max_len``, the dtype and the kind's own settings. A file whose key differs, or that
  cannot be read, is reported and rebuilt, never used; it is written atomically (a temporary file
  renamed over the old one), so a killed run never leaves a torn cache;
* the build is split over ranks (rank ``r`` of ``W`` takes examples ``r, r + W, ...``) through the
  engine's no-grad forwards (ranks with fewer batches stay in step on every engine) and completed on
  every rank by two all-reduces; every rank rebuilds if any rank must.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from bipost.engine import Engine, LocalComm

log = logging.getLogger("bipost")

FORMAT_VERSION = 1
"""Part of every cache key: bump it when the meaning of the cached values changes."""

Content = Callable[[object], tuple]
"""``content(example)`` -> the example's token-id sequences that its cached values depend on."""


def _parts_bytes(parts: tuple) -> bytes:
    """Each id sequence as its length (4 bytes) and its ids as little-endian int64."""
    out = bytearray()
    for part in parts:
        out += len(part).to_bytes(4, "little")
        out += np.asarray(part, dtype="<i8").tobytes()
    return bytes(out)


def content_key(parts: tuple) -> bytes:
    """A 16-byte digest of an example's id sequences (the lookup key of its cached rows)."""
    return hashlib.blake2b(_parts_bytes(parts), digest_size=16).digest()


@dataclass
class ExampleCache:
    """Cached rows per example (see the module docstring)."""

    index: dict[bytes, int]
    """``content_key(content(example))`` -> the example's number."""
    offsets: torch.Tensor
    """``[N + 1]`` int64."""
    tensors: dict[str, torch.Tensor]
    """Name -> ``[P, ...]`` rows."""
    content: Content

    @classmethod
    def of(cls, examples: Sequence, content: Content, offsets: torch.Tensor,
           tensors: dict[str, torch.Tensor]) -> "ExampleCache":
        return cls({content_key(content(e)): i for i, e in enumerate(examples)}, offsets, tensors, content)

    def rows(self, examples: Sequence) -> dict[str, torch.Tensor]:
        """Every cached tensor's rows of ``examples``, example after example."""
        spans = []
        for e in examples:
            i = self.index.get(content_key(self.content(e)))
            if i is None:
                raise KeyError(f"example row {e.row_id} is not in the cache: it was built from other data")
            spans.append(torch.arange(int(self.offsets[i]), int(self.offsets[i + 1])))
        sel = torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long)
        return {name: t[sel] for name, t in self.tensors.items()}

    def attach(self, collate: Callable[[list], dict], put: Callable[[dict, dict[str, torch.Tensor]], None]
               ) -> Callable[[list], dict]:
        """``collate`` whose batches also carry their examples' cached rows: ``put(batch, rows)`` says
        under which keys (and in which layout) an objective reads them."""
        def with_rows(examples: list) -> dict:
            batch = collate(examples)
            put(batch, self.rows(examples))
            return batch

        return with_rows


# ---------------------------------------------------------------- keys
def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def data_fingerprint(examples: Sequence, content: Content) -> str:
    """Hash of every example's token ids, order included."""
    h = hashlib.sha256()
    for e in examples:
        h.update(_parts_bytes(content(e)))
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


def cache_meta(examples: Sequence, content: Content, role: str, model: str, tokenizer, max_len: int,
               dtype: str, **settings) -> dict:
    """What a cache of a ``role`` model's (``reference``, ``teacher``) outputs depends on;
    ``settings`` adds the kind's own (e.g. ``k`` and ``temperature``)."""
    return {
        "version": FORMAT_VERSION,
        "examples": len(examples),
        "data": data_fingerprint(examples, content),
        role: model,
        f"{role}_files": model_fingerprint(model),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_len": max_len,
        "dtype": dtype,
        **settings,
    }


# ---------------------------------------------------------------- build
def compute_rows(examples: Sequence, model, fn: Callable[[object, dict], tuple[dict[str, torch.Tensor], torch.Tensor]],
                 collate: Callable[[list], dict], batch_size: int, comm: "LocalComm | Engine"
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(offsets [N + 1], {name: [P, ...]})``: every example's rows, on every rank, without grad.

    ``fn(model, batch)`` returns ``({name: [R, ...]}, seq [R])`` for a collated batch, ``seq`` naming
    the batch example (ascending) each row belongs to. Rank ``r`` computes examples ``r, r + W, ...``
    through the engine's no-grad forwards (ranks with fewer batches stay in step where every forward
    is a collective); one all-reduce completes the row counts, a second the rows (in float64: exact
    for token ids below 2**53 and for fp32 values)."""
    n, world = len(examples), comm.world_size
    mine = list(range(comm.rank, n, world))
    batches = [mine[s:s + batch_size] for s in range(0, len(mine), batch_size)]
    # A rank without examples (more ranks than examples) runs one uncounted batch all the same, to
    # learn the cached tensors' shapes.
    spare = [[0]] if n and not batches else []
    outs = comm.no_grad_forwards(model, fn, _Collated(batches + spare, examples, collate),
                                 filler=collate([examples[0]]) if n else None, stage="forwards")
    shapes = {k: (tuple(v.shape[1:]), v.dtype) for k, v in outs[0][0].items()} if outs else {}
    counts = torch.zeros(n, dtype=torch.float64)
    local = []
    for idx, (values, seq) in zip(batches, outs):
        seq = seq.cpu()
        counts[idx] = torch.bincount(seq, minlength=len(idx)).double()
        local.append((idx, {k: v.cpu() for k, v in values.items()}, seq))
    if world > 1:
        counts = comm.all_reduce_sum(counts).cpu()
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    offsets[1:] = counts.round().long().cumsum(0)
    total = int(offsets[-1])
    table = {k: torch.zeros((total, *shape), dtype=torch.float64) for k, (shape, _) in shapes.items()}
    for idx, values, seq in local:
        starts = offsets[torch.tensor(idx)]
        within = torch.arange(seq.numel()) - torch.searchsorted(seq, seq)  # row number inside its example
        dest = starts[seq] + within
        for k, v in values.items():
            table[k][dest] = v.double()
    if world > 1:
        table = {k: comm.all_reduce_sum(v).cpu() for k, v in table.items()}
    return offsets, {k: table[k].to(dtype) for k, (_, dtype) in shapes.items()}


class _Collated(Sequence):
    """Batches of example indices, collated when the forwards reach them (not all held at once)."""

    def __init__(self, batches: list[list[int]], examples: Sequence, collate: Callable[[list], dict]):
        self.batches, self.examples, self.collate = batches, examples, collate

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i):
        return self.collate([self.examples[j] for j in self.batches[i]])


# ---------------------------------------------------------------- load / save
def load_or_build(path: Path, examples: Sequence, content: Content, meta: dict,
                  build: Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]],
                  comm: "LocalComm | Engine", what: str, check: Callable[[dict[str, torch.Tensor]], str | None] = lambda t: None
                  ) -> ExampleCache:
    """The cache at ``path`` if its key matches ``meta`` (and ``check(tensors)`` finds nothing wrong);
    otherwise ``build()`` it (on every rank, if any rank must: their collectives then match) and save
    it from the main rank. A collective that fails or hangs inside names this cache build."""
    with comm.stage(f"{what} cache build ({path.stem})"):
        return _load_or_build(path, examples, content, meta, build, comm, what, check)


def _load_or_build(path, examples, content, meta, build, comm, what, check) -> ExampleCache:
    key = _sha(meta)
    found = _read(path, key, meta, what, len(examples))
    if found is not None:
        problem = check(found[1])
        if problem:
            log.warning("%s cache %s %s; rebuilding", what, path, problem)
            found = None
    if comm.any_rank(found is None):
        log.info("computing %s of %d examples -> %s", what, len(examples), path)
        offsets, tensors = build()
        if comm.is_main:
            _write(path, key, meta, offsets, tensors)
        comm.barrier()
    else:
        log.info("%s of %d examples from %s", what, len(examples), path)
        offsets, tensors = found  # type: ignore[misc]
    return ExampleCache.of(examples, content, offsets, tensors)


def _write(path: Path, key: str, meta: dict, offsets: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save({"key": key, "meta": json.dumps(meta, sort_keys=True), "offsets": offsets, **tensors}, tmp)
    os.replace(tmp, path)


def _read(path: Path, key: str, meta: dict, what: str, n: int) -> tuple[torch.Tensor, dict] | None:
    """``(offsets, tensors)`` saved at ``path`` if it reads, its key is ``key`` and it holds ``n``
    examples; else None (and why, logged). Files of the first cache version without ``offsets``
    (one row per example) read as well."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        saved_key, saved_meta = saved.pop("key"), json.loads(saved.pop("meta"))
    except Exception as err:  # truncated or foreign file
        log.warning("%s cache %s is unreadable (%s); rebuilding", what, path, err)
        return None
    if saved_key != key:
        changed = sorted(k for k in set(meta) | set(saved_meta) if meta.get(k) != saved_meta.get(k))
        log.warning("%s cache %s is stale (changed: %s); rebuilding", what, path, ", ".join(changed) or "key")
        return None
    offsets = saved.pop("offsets", None)
    if offsets is None:
        offsets = torch.arange(n + 1, dtype=torch.int64)
    if offsets.shape != (n + 1,) or any(t.shape[0] != int(offsets[-1]) for t in saved.values()):
        log.warning("%s cache %s does not fit %d examples; rebuilding", what, path, n)
        return None
    return offsets, saved

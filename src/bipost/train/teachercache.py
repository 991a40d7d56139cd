"""A KD teacher's top-k log-probs computed once, cached on disk, and attached to KD batches.

With ``objectives.N.kd_topk = k`` a KD objective distils from the teacher's ``k`` most likely
tokens at each response position (``objectives.kd.topk_kd_loss``). Those are a fixed function
of each example, so with ``objectives.N.cache_teacher`` they are computed in one no-grad pass
before training (train and eval examples), saved to ``<cache_dir>/teacher-<objective>.pt``, and
the objective's collate adds them to every batch as ``teacher_topk_ids`` / ``teacher_topk_logps``
(``[M, k]``, one row per position that predicts a response token, in the batch's position
order: sequence by sequence, positions ascending). No teacher stays in memory while training.

Size: ``8 k`` bytes per response token (int32 ids, fp32 log-probs): k = 32 over 10 M response
tokens is 2.6 GB. The key is the reference cache's (``refcache.cache_meta``: data, teacher files,
tokenizer, ``max_len``, dtype) plus ``k`` and the temperature; a file whose key differs is
reported and rebuilt, never used. Every rank runs the whole build pass (a sharded teacher's
forwards are collectives); the main rank writes the file atomically.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from bipost.data.types import SFTExample
from bipost.train.refcache import _sha, cache_meta, content_key, read_cache, write_cache

log = logging.getLogger("bipost")


@dataclass
class TeacherTopK:
    """Per example (by content): the teacher's top-k token ids and log-probs at each position."""

    index: dict[bytes, int]
    """``content_key(content(example))`` -> its number in ``offsets``."""
    offsets: torch.Tensor
    """``[N + 1]`` int64: example ``i``'s positions are rows ``offsets[i]:offsets[i + 1]``."""
    ids: torch.Tensor
    """``[P, k]`` int32 token ids, most likely first."""
    logps: torch.Tensor
    """``[P, k]`` float32 teacher log-probs (log-softmax over the full vocabulary at the temperature)."""

    @staticmethod
    def content(e: SFTExample) -> tuple:
        return (e.prompt_ids, e.response_ids)

    @classmethod
    def of(cls, examples: Sequence[SFTExample], offsets: torch.Tensor, ids: torch.Tensor,
           logps: torch.Tensor) -> "TeacherTopK":
        return cls({content_key(cls.content(e)): i for i, e in enumerate(examples)}, offsets, ids, logps)

    def lookup(self, examples: Sequence[SFTExample]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [M, k] int64, logps [M, k] float32)`` of ``examples``' positions, in batch order."""
        rows = []
        for e in examples:
            i = self.index.get(content_key(self.content(e)))
            if i is None:
                raise KeyError(f"example row {e.row_id} is not in the teacher cache")
            rows.append(torch.arange(int(self.offsets[i]), int(self.offsets[i + 1])))
        sel = torch.cat(rows)
        return self.ids[sel].long(), self.logps[sel]


def teacher_cache_meta(examples: Sequence[SFTExample], teacher: str, tokenizer, max_len: int, dtype: str,
                       k: int, temperature: float) -> dict:
    return {**cache_meta(examples, teacher, tokenizer, max_len, dtype, role="teacher", content=TeacherTopK.content),
            "k": k, "temperature": temperature}


def compute_teacher_topk(examples: Sequence[SFTExample], topk_fn: Callable[[dict], tuple],
                         collate: Callable[[list], dict], batch_size: int,
                         to_device: Callable[[dict], dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(offsets, ids, logps)`` for ``examples``, without grad.

    ``topk_fn(batch)`` returns ``(ids [M, k], logps [M, k], seq [M])`` for a collated batch
    (``seq``: the example of each position, ascending).
    """
    counts, all_ids, all_logps = [], [], []
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            chunk = list(examples[s:s + batch_size])
            ids, logps, seq = topk_fn(to_device(collate(chunk)))
            counts += torch.bincount(seq.cpu(), minlength=len(chunk)).tolist()
            all_ids.append(ids.to("cpu", torch.int32))
            all_logps.append(logps.to("cpu", torch.float32))
    offsets = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0)
    return offsets, torch.cat(all_ids), torch.cat(all_logps)


def load_or_build_teacher(path: Path, examples: Sequence[SFTExample], meta: dict,
                          build: Callable[[], tuple], is_main: bool = True,
                          barrier: Callable[[], None] = lambda: None,
                          any_rank: Callable[[bool], bool] = lambda flag: flag) -> TeacherTopK:
    """The cache at ``path`` if its key matches ``meta``; otherwise ``build()`` it and save it
    (on every rank if any rank must: see ``refcache.load_or_build``)."""
    key = _sha(meta)
    saved = read_cache(path, key, meta, "teacher")
    values = None
    if saved is not None:
        try:
            values = (saved["offsets"], saved["ids"], saved["logps"])
        except KeyError as err:
            log.warning("teacher cache %s lacks %s; rebuilding", path, err)
    if values is not None and (values[0].shape != (len(examples) + 1,) or values[1].shape[1] != meta["k"]):
        log.warning("teacher cache %s does not fit %d examples and k=%d; rebuilding", path, len(examples), meta["k"])
        values = None
    if any_rank(values is None):
        log.info("computing the teacher's top-%d log-probs of %d examples -> %s", meta["k"], len(examples), path)
        values = build()
        if is_main:
            write_cache(path, key, meta, dict(zip(("offsets", "ids", "logps"), values)))
        barrier()
    else:
        log.info("teacher top-%d log-probs of %d examples from %s", meta["k"], len(examples), path)
    return TeacherTopK.of(examples, *values)

"""Distillation losses straight from hidden states (or logits), in chunks of positions, so the
full-vocabulary fp32 logits of the student and the teacher never exist at once.

These are the memory-lean forms of ``kd.kd_loss`` and ``kd.topk_kd_loss`` (which stay the reference
definitions; ``tests/test_chunked.py`` checks the two agree in values and gradients). They work on
the ``M`` selected positions that predict a response token (see ``segments``):

* ``student_hidden`` ``[M, H]`` and a ``head`` turning it into logits (the lm_head, or the identity
  when logits are passed in),
* ``seq`` ``[M]``: which sequence each position belongs to.

Each chunk runs under ``torch.utils.checkpoint``, so the backward recomputes the chunk's logits
instead of keeping them.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from bipost.objectives.base import ObjectiveOutput
from bipost.objectives.kd import kd_loss, topk_kd_loss
from bipost.objectives.segments import segment_count, segment_sum


def chunked_kd_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    teacher_head: Callable[[torch.Tensor], torch.Tensor],
    seq: torch.Tensor,
    num_seqs: int,
    *,
    kind: str = "forward",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    chunk_size: int = 1024,
) -> ObjectiveOutput:
    """``kd_loss`` over selected positions, ``chunk_size`` positions at a time.

    Each chunk computes both models' logits from their hidden states (teacher without grad),
    applies the reference :func:`bipost.objectives.kd.kd_loss` to them as ``[m, 1, V]`` (one
    position per "example", so its per-example losses are per-position losses) and is wrapped
    in ``torch.utils.checkpoint`` so the backward recomputes the chunk rather than keeping it.
    Per-position losses are then summed per sequence: the result has the reduction contract of
    ``kd_loss`` on the padded batch (``losses`` ``[S]``, ``units`` ``[S]``, metrics ``kd`` and,
    for ``forward``, ``kl``).
    """
    teacher_hidden = teacher_hidden.detach()

    def piece(hs: torch.Tensor, ht: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zs = student_head(hs)
        with torch.no_grad():
            zt = teacher_head(ht)
        ones = torch.ones(hs.shape[0], 1, dtype=torch.bool, device=hs.device)
        out = kd_loss(zs[:, None], zt[:, None], ones, kind=kind, temperature=temperature, jsd_beta=jsd_beta)
        kl = out.metrics.get("kl", torch.zeros_like(out.losses))
        return out.losses, kl

    return _per_sequence_kd(piece, (student_hidden, teacher_hidden), seq, num_seqs, chunk_size,
                            with_kl=kind == "forward")


def _per_sequence_kd(piece: Callable, inputs: tuple[torch.Tensor, ...], seq: torch.Tensor, num_seqs: int,
                     chunk_size: int, with_kl: bool) -> ObjectiveOutput:
    """Run ``piece`` (per-position ``(loss, kl)``) over chunks of ``inputs``' rows, each chunk
    checkpointed, and sum per sequence: ``losses``/``units`` ``[S]``, metrics ``kd`` (and ``kl``)."""
    losses, kls = [], []
    for s in range(0, inputs[0].shape[0], chunk_size):
        loss_c, kl_c = checkpoint(piece, *(x[s:s + chunk_size] for x in inputs), use_reentrant=False)
        losses.append(loss_c)
        kls.append(kl_c.detach())
    if not losses:  # no response token at all: a zero still connected to the graph
        losses, kls = [(inputs[0].sum() * 0.0).float().expand(0)], [torch.zeros(0, device=seq.device)]
    per_seq = segment_sum(torch.cat(losses), seq, num_seqs)
    units = segment_count(seq, num_seqs)
    denom = units.clamp(min=1.0)
    metrics = {"kd": per_seq.detach() / denom}
    if with_kl:
        metrics["kl"] = segment_sum(torch.cat(kls), seq, num_seqs) / denom
    return ObjectiveOutput(losses=per_seq, units=units, metrics=metrics)


# ---------------------------------------------------------------- top-k distillation
def teacher_topk(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], k: int,
                 temperature: float = 1.0, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's ``k`` most likely tokens at each position and their log-probs (log-softmax
    over the whole vocabulary at ``temperature``), chunk by chunk, without grad: ``(ids [M, k]
    int64, logps [M, k] float32)``."""
    ids, logps = [], []
    with torch.no_grad():
        for s in range(0, hidden.shape[0], chunk_size):
            z = head(hidden[s:s + chunk_size]).float()
            lp = torch.log_softmax(z / temperature if temperature != 1.0 else z, dim=-1)
            top = lp.topk(min(k, lp.shape[-1]), dim=-1)
            ids.append(top.indices)
            logps.append(top.values)
    if not ids:
        return (torch.zeros(0, k, dtype=torch.long, device=hidden.device),
                torch.zeros(0, k, dtype=torch.float32, device=hidden.device))
    return torch.cat(ids), torch.cat(logps)


def chunked_topk_kd_loss(student_hidden: torch.Tensor, student_head: Callable[[torch.Tensor], torch.Tensor],
                         teacher_ids: torch.Tensor, teacher_logps: torch.Tensor, seq: torch.Tensor,
                         num_seqs: int, *, temperature: float = 1.0, chunk_size: int = 1024) -> ObjectiveOutput:
    """:func:`bipost.objectives.kd.topk_kd_loss` over selected positions, chunk by chunk (each
    chunk checkpointed, as in :func:`chunked_kd_loss`), summed per sequence: ``losses`` ``[S]``,
    ``units`` ``[S]``, metrics ``kd`` and ``kl``. Only the teacher's ``[M, k]`` ids and log-probs
    are needed (e.g. from the teacher cache), not the teacher."""

    def piece(hs: torch.Tensor, ids: torch.Tensor, tl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = student_head(hs).float()
        if temperature != 1.0:
            z = z / temperature
        student = z.gather(1, ids) - torch.logsumexp(z, dim=-1, keepdim=True)
        return topk_kd_loss(student, tl, temperature)

    return _per_sequence_kd(piece, (student_hidden, teacher_ids, teacher_logps), seq, num_seqs, chunk_size,
                            with_kl=True)

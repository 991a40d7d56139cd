"""Log-probs and distillation losses straight from hidden states, in chunks of positions, so the
full-vocabulary fp32 logits ``[tokens, V]`` never exist at once (forward *or* backward).

These are the memory-lean variants of ``logprobs.py`` and ``kd.py`` (which stay the reference
definitions; tests check the two agree in values and gradients). They work on *selected*
positions only — the ``M`` positions that predict a response token — given as

* ``hidden`` ``[M, H]``: the final hidden state at each such position (the lm_head input),
* ``targets`` ``[M]``: the token it predicts (labels already shifted: see :func:`response_targets`),
* ``seq`` ``[M]``: which sequence of the micro-batch the position belongs to, in ``[0, S)``.

Prompt and padding positions never reach the lm_head, which alone saves its cost on them.

How the backward stays small: :class:`LinearLogProbs` keeps only the per-position logsumexp
``[M]`` and recomputes one chunk's logits at a time in the backward (one extra lm_head matmul
per chunk, the price of not storing ``[M, V]``). :func:`chunked_kd_loss` does the same with
``torch.utils.checkpoint`` around each chunk of the reference ``kd_loss``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bipost.objectives.base import ObjectiveOutput
from bipost.objectives.kd import kd_loss, topk_kd_loss
from bipost.objectives.logprobs import IGNORE_INDEX

DEFAULT_CHUNK_BYTES = 256 * 2**20
"""Automatic chunk size: the fp32 logits of one chunk take at most this many bytes."""


def auto_chunk_size(vocab_size: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Positions per chunk such that one chunk's fp32 logits fit in ``chunk_bytes`` (at least 16)."""
    return max(16, chunk_bytes // (4 * max(1, vocab_size)))


# ---------------------------------------------------------------- selecting response positions
def response_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The positions of a padded ``[B, T]`` batch that predict a response token.

    Same convention as ``logprobs.token_logprobs``: position ``t`` of row ``b`` predicts
    ``labels[b, t + 1]``. Returns ``(index, targets, seq)``, each ``[M]`` long: ``index`` is the
    flat position ``b * T + t`` into ``hidden.view(B * T, H)``, ``targets`` the predicted token,
    ``seq`` the row ``b`` (sorted ascending, positions in order within a row).
    """
    b, t = torch.nonzero(labels[:, 1:] != ignore_index, as_tuple=True)
    return b * labels.shape[1] + t, labels[b, t + 1], b


def segment_sum(values: torch.Tensor, seq: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """``out[s] = sum(values[seq == s])`` in fp32 (differentiable)."""
    return values.new_zeros(num_seqs, dtype=torch.float32).index_add(0, seq, values.float())


def segment_count(seq: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """``out[s] = #(seq == s)`` as float32 (an index_add: no host sync, unlike bincount on CUDA)."""
    return torch.zeros(num_seqs, dtype=torch.float32, device=seq.device).index_add_(
        0, seq, torch.ones(seq.shape, dtype=torch.float32, device=seq.device))


def sequence_sft_loss(token_logps: torch.Tensor, seq: torch.Tensor, num_seqs: int) -> ObjectiveOutput:
    """``sft_loss`` on per-position log-probs (:func:`pad_by_sequence` + ``sft_loss`` give the
    same): ``losses[s]`` = summed NLL of sequence ``s``, ``units[s]`` its token count, metric
    ``nll`` the per-sequence mean (0 with no tokens). No padded copy, no host sync."""
    losses = segment_sum(-token_logps, seq, num_seqs)
    units = segment_count(seq, num_seqs)
    return ObjectiveOutput(losses=losses, units=units, metrics={"nll": losses.detach() / units.clamp(min=1.0)})


def pad_by_sequence(values: torch.Tensor, seq: torch.Tensor, num_seqs: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay per-position ``values`` ``[M]`` out as ``[S, L]`` rows (``L`` = most positions of a
    sequence), in their original order within each sequence, plus the bool mask of filled cells.
    This lets the reference loss functions (e.g. ``sft_loss``) consume chunked log-probs."""
    counts = torch.bincount(seq, minlength=num_seqs)
    width = int(counts.max()) if seq.numel() else 0
    order = torch.argsort(seq, stable=True)
    sorted_seq = seq[order]
    starts = torch.cumsum(counts, 0) - counts
    col = torch.arange(seq.numel(), device=seq.device) - starts[sorted_seq]
    padded = values.new_zeros(num_seqs, width).index_put((sorted_seq, col), values[order])
    mask = torch.zeros(num_seqs, width, dtype=torch.bool, device=seq.device)
    mask[sorted_seq, col] = True
    return padded, mask


# ---------------------------------------------------------------- chunked lm_head log-probs
_MM_OUT_DTYPE = "out_dtype" in (torch.addmm.__doc__ or "")


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` into an fp32 ``acc`` without rounding each chunk's product to bf16 first
    (half-precision operands on CUDA: tensor cores with an fp32 output; else an fp32 matmul)."""
    global _MM_OUT_DTYPE
    if a.dtype in (torch.float16, torch.bfloat16) and acc.device.type == "cuda" and _MM_OUT_DTYPE:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError):  # this torch build lacks out_dtype for addmm
            _MM_OUT_DTYPE = False
    acc.addmm_(a.float(), b.float())


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(h, weight, bias).float()


# The two elementwise halves of a chunk, written once; LinearLogProbs runs them eagerly or, with
# ``compiled=True``, through torch.compile, which fuses each into one kernel that reads the
# half-precision logits once (eagerly, each step materialises a [chunk, V] fp32 tensor).
def _pick_and_lse(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    return z.gather(1, targets[:, None]).squeeze(1) - lse, lse


def _grad_logits(logits: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``g * (onehot(targets) - softmax(logits))`` in the logits' dtype."""
    return _grad_logits_fp32(logits, lse, g, targets).to(logits.dtype)


def _grad_logits_and_bias(logits: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, targets: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_grad_logits` and its column sum (the bias gradient), summed in fp32."""
    dz = _grad_logits_fp32(logits, lse, g, targets)
    return dz.to(logits.dtype), dz.sum(0)


def _grad_logits_fp32(logits, lse, g, targets) -> torch.Tensor:
    z = logits.float()
    cols = torch.arange(z.shape[1], device=z.device)
    return g[:, None] * ((cols[None, :] == targets[:, None]).float() - torch.exp(z - lse[:, None]))


_COMPILED: dict = {}


def _compiled(fn: Callable) -> Callable:
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


class LinearLogProbs(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T + bias)[i, targets[i]]`` in chunks of positions.

    Forward keeps, per position, only the logsumexp; backward recomputes each chunk's logits,
    turns them into ``g * (onehot - softmax)`` and projects back, accumulating the weight
    gradient in fp32. Peak extra memory: about two ``[chunk, V]`` fp32 buffers (eager), or a
    half-precision logits and gradient buffer (``compiled``).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int, compiled: bool):  # type: ignore[override]
        m = hidden.shape[0]
        out = torch.empty(m, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(m, dtype=torch.float32, device=hidden.device)
        pick = _compiled(_pick_and_lse) if compiled else _pick_and_lse
        for s in range(0, m, chunk_size):
            logits = F.linear(hidden[s:s + chunk_size], weight, bias)
            out[s:s + chunk_size], lse[s:s + chunk_size] = pick(logits, targets[s:s + chunk_size])
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size, ctx.compiled = chunk_size, compiled
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        grad_out = grad_out.float()
        cs = ctx.chunk_size
        rows = torch.arange(min(cs, hidden.shape[0]), device=hidden.device)
        grad_fn = None
        if ctx.compiled:
            grad_fn = _compiled(_grad_logits_and_bias if need_b else _grad_logits)
        for s in range(0, hidden.shape[0], cs):
            h = hidden[s:s + cs]
            g = grad_out[s:s + cs]
            if grad_fn is not None:
                dz = grad_fn(F.linear(h, weight, bias), lse[s:s + cs], g, targets[s:s + cs])
                if need_b:
                    dz, col_sum = dz
                    grad_b += col_sum  # type: ignore[operator]
            else:
                # d logp_i / d z_ij = 1[j = y_i] - softmax_ij; scaled by the upstream g_i. In place.
                dz = _chunk_logits(h, weight, bias).sub_(lse[s:s + cs, None]).exp_().mul_(-g[:, None])
                dz[rows[: h.shape[0]], targets[s:s + cs]] += g
                if need_b:
                    grad_b += dz.sum(0)  # type: ignore[operator]
                # Matmuls in the model's dtype (bf16 tensor cores on GPU), weight grad summed in fp32.
                dz = dz.to(weight.dtype)
            if need_h:
                grad_h[s:s + cs] = dz @ weight  # type: ignore[index]
            if need_w:
                _addmm_fp32(grad_w, dz.t(), h)  # type: ignore[arg-type]
            del dz
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None


def chunked_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           bias: torch.Tensor | None = None, chunk_size: int = 0,
                           compiled: bool = False) -> torch.Tensor:
    """Per-position log-prob ``[M]`` (fp32) of ``targets`` under a linear lm_head, chunked.

    Equals ``log_softmax(F.linear(hidden, weight, bias).float())[i, targets[i]]`` (values and
    gradients) without materialising the ``[M, V]`` logits; ``chunk_size=0`` picks
    :func:`auto_chunk_size`. ``compiled`` fuses each chunk's elementwise work with torch.compile.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden [M, H] and targets [M], got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    chunk = chunk_size or auto_chunk_size(weight.shape[0])
    if hidden.shape[0] == 0:
        # Still connected to the graph, so an all-prompt micro-batch backpropagates a zero.
        return (hidden.sum() * 0.0).float().expand(0)
    return LinearLogProbs.apply(hidden, weight, bias, targets, chunk, compiled)


def module_token_logprobs(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                          targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Like :func:`chunked_token_logprobs` for any head module (e.g. a LoRA-adapted lm_head):
    each chunk runs under ``torch.utils.checkpoint``, so its logits are recomputed in the
    backward instead of being kept."""

    def piece(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()
        return logits.gather(1, t[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)

    parts = [checkpoint(piece, hidden[s:s + chunk_size], targets[s:s + chunk_size], use_reentrant=False)
             for s in range(0, hidden.shape[0], chunk_size)]
    return torch.cat(parts) if parts else (hidden.sum() * 0.0).float().expand(0)


# ---------------------------------------------------------------- chunked distillation
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

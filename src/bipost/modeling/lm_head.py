"""Log-probs of chosen tokens straight from hidden states through a linear lm_head, in chunks of
positions, so the full-vocabulary fp32 logits ``[M, V]`` never exist at once (forward or backward).

This is model-side numerics, not an objective: :class:`LinearLogProbs` is a custom autograd function
that keeps, per position, only the logsumexp ``[M]`` and recomputes one chunk's logits at a time in
the backward (one extra lm_head matmul per chunk, the price of not storing ``[M, V]``). With
``compiled=True`` each chunk's elementwise work is fused by torch.compile. The reference definition
it must equal (values and gradients) is ``objectives.logprobs``; ``tests/test_chunked.py`` checks.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_BYTES = 256 * 2**20
"""Automatic chunk size: the fp32 logits of one chunk take at most this many bytes."""


def auto_chunk_size(vocab_size: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Positions per chunk such that one chunk's fp32 logits fit in ``chunk_bytes`` (at least 16)."""
    return max(16, chunk_bytes // (4 * max(1, vocab_size)))


# ---------------------------------------------------------------- the kernel
@functools.lru_cache(maxsize=None)
def _addmm_out_dtype(dtype: torch.dtype) -> bool:
    """Whether this torch build's CUDA ``addmm`` takes ``out_dtype=float32`` for ``dtype`` operands
    (probed once per dtype on a tiny product)."""
    if "out_dtype" not in (torch.addmm.__doc__ or ""):
        return False
    try:
        acc = torch.zeros(1, 1, dtype=torch.float32, device="cuda")
        one = torch.ones(1, 1, dtype=dtype, device="cuda")
        torch.addmm(acc, one, one, out_dtype=torch.float32, out=acc)
        return True
    except (TypeError, RuntimeError):
        return False


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` into an fp32 ``acc`` without rounding each chunk's product to bf16 first
    (half-precision operands on CUDA: tensor cores with an fp32 output; else an fp32 matmul)."""
    if a.dtype in (torch.float16, torch.bfloat16) and acc.device.type == "cuda" and _addmm_out_dtype(a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return
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


@functools.lru_cache(maxsize=None)
def _compiled(fn: Callable) -> Callable:
    """``fn`` through torch.compile, compiled once per process (dynamic shapes: chunks vary)."""
    return torch.compile(fn, dynamic=True)


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

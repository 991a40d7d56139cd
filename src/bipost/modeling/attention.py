"""Attention over packed rows: sequences laid end to end in one row never attend to each other.

A packed micro-batch (``bipost.data.packing``) is a single row of ``T`` tokens holding many
sequences. Its :class:`~bipost.data.packing.PackedLayout` says which keys each query may see. The row is tiled, in order,
by *segments*; a segment is a query span ``[q0, q1)`` that attends

* causally to itself (query ``q0 + i`` sees keys ``q0 .. q0 + i``), and
* fully to an optional earlier *prefix* span ``[p0, p1)``: the prompt that a DPO pair's rejected
  response shares with its chosen one, which is laid out (and computed) only once.

So an SFT row is ``[s_1 | s_2 | ...]`` (no prefixes) and a DPO row is
``[p_1 c_1 | p_2 c_2 | ... | r_1 | r_2 | ...]`` where ``r_i`` has prefix ``p_i``: the rejected
tokens see exactly what they would see in their own padded row ``p_i r_i``.

Two kernels compute it:

* ``varlen`` (CUDA, sm80+: ATen's flash-attention op): one flash-attention varlen call for the
  segments without a prefix and one for those with a prefix (their keys gathered as
  ``p_i ++ r_i``; causal alignment is bottom-right, so the last query sees every key);
* ``sdpa`` (anywhere): ``scaled_dot_product_attention`` per segment. Cost is ``sum(len_i^2)``,
  never ``T^2`` as a block-diagonal mask over the whole row would be.

The function is registered with transformers' ``AttentionInterface`` as ``bipost_packed_<base>``
(:func:`use_packed_attention`). Calls without a layout (padded batches, generation) go to the
base implementation unchanged, so one model serves packed and padded batches alike.
"""

from __future__ import annotations

import bisect
import functools
from typing import Callable

import torch
import torch.nn.functional as F

from bipost.data.packing import PackedLayout

BASES = ("sdpa", "flash_attention_2")
"""Attention implementations a model may have when packing is on (padded calls go to them)."""


# ---------------------------------------------------------------- kernels
def _varlen_call(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """Causal varlen flash attention on ``[tokens, heads, dim]`` tensors (``k``/``v`` may have
    fewer heads: GQA is native to the kernel). Causal alignment is bottom-right, so a query span
    shorter than its keys (a prefixed segment) ends on the last key.

    This is ATen's own flash op (what ``torch.nn.attention.varlen.varlen_attn`` wraps), called
    directly: it has its autograd formula in C++ and traces into compiled graphs, where the
    Python custom op around it cost ~0.4 ms of host time per layer and step on an H100.
    """
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False,
                                                   scale=scale)[0]


def varlen_available(device: torch.device) -> bool:
    """Flash varlen needs a CUDA GPU of compute capability 8.0 or newer and a torch built with it."""
    return device.type == "cuda" and _flash_capable(device.index if device.index is not None else -1)


@functools.lru_cache(maxsize=None)
def _flash_capable(index: int) -> bool:
    if not torch.backends.cuda.is_flash_attention_available():
        return False
    return torch.cuda.get_device_capability(index if index >= 0 else None)[0] >= 8


def _packed_varlen(q, k, v, args: dict, scale: float) -> torch.Tensor:
    """``args`` is :meth:`PackedLayout.varlen_args`: tensors and ints only, so this traces into a
    compiled decoder layer without guarding on (and recompiling for) each step's layout."""
    # [1, H, T, D] -> [T, H, D]
    qt, kt, vt = (x[0].transpose(0, 1) for x in (q, k, v))
    outs = []
    if "plain" in args:
        cu, mx = args["plain"]
        n = args["split"]
        outs.append(_varlen_call(qt[:n], kt[:n], vt[:n], cu, cu, mx, mx, scale))
    if "prefixed" in args:
        split, cu_q, cu_k, mq, mk, kidx = args["prefixed"]
        outs.append(_varlen_call(qt[split:], kt.index_select(0, kidx), vt.index_select(0, kidx),
                                 cu_q, cu_k, mq, mk, scale))
    return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]  # [T, H, D]


def _lower_right_causal(lq: int, lk: int, device) -> torch.Tensor:
    """Query ``i`` of ``lq`` sees keys ``0 .. lk - lq + i`` (a suffix of ``lq`` queries over ``lk`` keys)."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(diagonal=lk - lq)


def _packed_sdpa(q, k, v, layout: PackedLayout, scale: float, dropout: float) -> torch.Tensor:
    gqa = k.shape[1] != q.shape[1]
    # Split (not slice) the row: the backward of a split is one concatenation, whereas each slice
    # of the whole row would scatter its gradient into a zero-filled row-sized tensor.
    lens = [q1 - q0 for q0, q1, _, _ in layout.segments]
    qs, ks, vs = (x.split(lens, dim=2) for x in (q, k, v))
    starts = [q0 for q0, _, _, _ in layout.segments]
    outs = []
    for i, (q0, q1, p0, p1) in enumerate(layout.segments):
        if p1 > p0:
            j = bisect.bisect_right(starts, p0) - 1  # the segment holding the prefix
            a, b = p0 - starts[j], p1 - starts[j]
            kk = torch.cat([ks[j][:, :, a:b], ks[i]], dim=2)
            vv = torch.cat([vs[j][:, :, a:b], vs[i]], dim=2)
            mask = _lower_right_causal(q1 - q0, kk.shape[2], q.device)
            o = F.scaled_dot_product_attention(qs[i], kk, vv, attn_mask=mask, dropout_p=dropout, scale=scale,
                                               enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(qs[i], ks[i], vs[i], is_causal=True, dropout_p=dropout,
                                               scale=scale, enable_gqa=gqa)
        outs.append(o)
    return torch.cat(outs, dim=2)[0].transpose(0, 1)  # [T, H, D]


def _varlen_applies(query: torch.Tensor, dropout: float) -> bool:
    return varlen_available(query.device) and dropout == 0.0 and query.dtype in (torch.float16, torch.bfloat16)


def packed_kwargs(layout: PackedLayout, device: torch.device) -> dict:
    """The model-call kwargs for a packed row on ``device``: the layout (for the per-segment SDPA
    fallback) and, where the varlen kernel exists, its precomputed arguments. The varlen path
    reads only the latter (tensors and ints), so a compiled decoder layer (``model.compile``)
    traces the attention inside its graph and does not guard on the layout object: once its
    shapes have turned dynamic, new layouts do not recompile it. (SFT rows and DPO rows, which
    have prefixed segments, are different graphs.)"""
    kw: dict = {"packed_layout": layout}
    if varlen_available(device):
        kw["packed_varlen"] = layout.varlen_args(device)
    return kw


@torch.compiler.disable  # a Python loop over the layout: keep it out of compiled decoder layers
def packed_attention(module, query, key, value, layout: PackedLayout, scaling: float | None = None,
                     dropout: float = 0.0) -> torch.Tensor:
    """Attention of a packed row. ``query`` ``[1, H, T, D]``, ``key``/``value`` ``[1, H_kv, T, D]``
    (after RoPE); returns ``[1, T, H, D]`` like transformers' attention functions."""
    if query.shape[0] != 1 or query.shape[2] != layout.length:
        raise ValueError(f"packed attention expects one row of {layout.length} tokens, got {tuple(query.shape)}")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if _varlen_applies(query, dropout):
        out = _packed_varlen(query, key, value, layout.varlen_args(query.device), scale)
    else:
        out = _packed_sdpa(query, key, value, layout, scale, dropout)
    return out.unsqueeze(0)


# ---------------------------------------------------------------- transformers registration
def _make_attention(base: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
        layout = kwargs.pop("packed_layout", None)
        varlen = kwargs.pop("packed_varlen", None)
        if layout is None and varlen is None:
            return ALL_ATTENTION_FUNCTIONS[base](module, query, key, value, attention_mask, dropout=dropout,
                                                 scaling=scaling, **kwargs)
        if kwargs.get("softcap") is not None or getattr(module, "sliding_window", None):
            raise ValueError("packed attention supports neither attention softcapping nor sliding windows; "
                             "set train.packing=false for this model")
        # packed_kwargs passes varlen arguments only where the kernel exists (no device query
        # here: this runs inside compiled layers).
        if varlen is not None and dropout == 0.0 and query.dtype in (torch.float16, torch.bfloat16):
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            return _packed_varlen(query, key, value, varlen, scale).unsqueeze(0), None
        return packed_attention(module, query, key, value, layout, scaling, dropout), None

    return attention


def _make_mask(base: str) -> Callable:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    def mask(*args, attention_mask=None, **kwargs):
        # No 2D padding mask: a packed row (the layout decides) or one unpadded sequence (causal).
        # Skipping the mask here also spares building a [T, T] block mask from the position ids.
        if attention_mask is None:
            return None
        return ALL_MASK_ATTENTION_FUNCTIONS[base](*args, attention_mask=attention_mask, **kwargs)

    return mask


def packed_name(base: str) -> str:
    return f"bipost_packed_{base}"


def use_packed_attention(model) -> str:
    """Switch ``model`` (a transformers model, possibly peft-wrapped) to packed-aware attention.

    Idempotent. Padded calls still run the model's original implementation (``sdpa`` or
    ``flash_attention_2``); calls with ``packed_layout=...`` run :func:`packed_attention`.
    Returns the registered implementation name.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = inner.config._attn_implementation
    if current.startswith("bipost_packed_"):
        return current
    if current not in BASES:
        raise ValueError(f"packing needs attn_implementation sdpa or flash_attention_2, the model has {current!r}")
    name = packed_name(current)
    AttentionInterface.register(name, _make_attention(current))
    AttentionMaskInterface.register(name, _make_mask(current))
    inner.set_attn_implementation(name)
    return name

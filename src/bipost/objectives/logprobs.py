"""Token log-probabilities from causal-LM logits: the one place where labels are shifted.

Conventions used by every objective in bipost:

* ``labels`` are **unshifted**: ``labels[b, t]`` is the token at input position ``t``
  (the same position as ``input_ids[b, t]``), set to ``ignore_index`` (``-100``) everywhere
  that is not part of the response (prompt, padding).
* A causal LM's ``logits[b, t]`` predict the *next* token, ``input_ids[b, t + 1]``.
  So the log-prob of response token ``labels[b, t + 1]`` lives at logits position ``t``,
  and every shifted tensor here has length ``T - 1``:

      logps[b, t] = log p(labels[b, t + 1] | tokens[b, :t + 1])      for t in [0, T - 1)
      mask[b, t]  = labels[b, t + 1] != ignore_index

  The last logits position (``T - 1``) predicts nothing we know and is dropped.
* Callers never shift by hand; they call :func:`next_token_mask` / :func:`token_logprobs`
  (or slice ``logits[:, :-1]`` together with :func:`next_token_mask`, as KD does).
"""

from __future__ import annotations

import torch

from bipost.data.types import IGNORE_INDEX


def next_token_mask(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Which logits positions predict a response token.

    Args:
        labels: ``[B, T]`` unshifted labels (``ignore_index`` off the response).

    Returns:
        Bool ``[B, T - 1]``: ``mask[b, t] = labels[b, t + 1] != ignore_index``, aligned with
        ``logits[:, :-1]``.
    """
    return labels[:, 1:] != ignore_index


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the (shifted) labels.

    ``logps[b, t] = logits[b, t, y] - logsumexp_v logits[b, t, v]`` with ``y = labels[b, t+1]``.
    This gather-minus-logsumexp form never materialises a second ``[B, T, V]`` log-softmax
    tensor (only the fp32 copy of the logits, needed anyway for bf16 models).

    Args:
        logits: ``[B, T, V]`` causal-LM logits, any float dtype (computed in fp32).
        labels: ``[B, T]`` unshifted labels, ``ignore_index`` off the response.
        ignore_index: label value that marks positions without a target.

    Returns:
        ``(logps, mask)``: ``logps`` float32 ``[B, T - 1]`` (exactly 0 where masked),
        ``mask`` bool ``[B, T - 1]`` (see :func:`next_token_mask`).
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"expected logits [B, T, V] and labels [B, T], got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != ignore_index
    # -100 is not a valid index for gather: point masked positions at token 0 and zero them below.
    safe_targets = torch.where(mask, targets, torch.zeros_like(targets))
    picked = torch.gather(logits, dim=-1, index=safe_targets.unsqueeze(-1)).squeeze(-1)
    logps = picked - torch.logsumexp(logits, dim=-1)
    # torch.where (not a multiply) so a non-finite value at a masked position cannot leak.
    logps = torch.where(mask, logps, torch.zeros_like(logps))
    return logps, mask


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probability per sequence (what DPO consumes).

    Args:
        logits: ``[B, T, V]``; labels: ``[B, T]`` unshifted (see module docstring).

    Returns:
        ``(sums, counts)``: float32 ``[B]`` sum of ``logps`` over response tokens, and float32
        ``[B]`` number of response tokens (``sums / counts`` is the per-token mean).
    """
    logps, mask = token_logprobs(logits, labels, ignore_index)
    return logps.sum(dim=-1), mask.sum(dim=-1).float()

"""Supervised fine-tuning: negative log-likelihood of the response tokens.

    losses[b] = -sum_t mask[b, t] * logps[b, t]      (summed NLL, see base.py's contract)
    units[b]  =  sum_t mask[b, t]                    (response-token count)

so ``sum(losses) / sum(units)`` over a step is the token-mean NLL of the global batch.
"""

from __future__ import annotations

import torch

from bipost.objectives.base import ObjectiveOutput


def sft_loss(token_logps: torch.Tensor, mask: torch.Tensor) -> ObjectiveOutput:
    """Summed per-example NLL.

    Args:
        token_logps: ``[B, T]`` per-token log-probs (e.g. from ``token_logprobs``).
        mask: ``[B, T]`` bool, True on positions that predict a response token.

    Returns:
        ``ObjectiveOutput`` with ``losses`` ``[B]`` (summed NLL), ``units`` ``[B]`` float
        (token count) and metric ``nll`` ``[B]`` (per-example mean NLL, 0 with no tokens).
    """
    if token_logps.shape != mask.shape:
        raise ValueError(
            f"token_logps {tuple(token_logps.shape)} and mask {tuple(mask.shape)} differ"
        )
    mask = mask.bool()
    token_logps = token_logps.float()
    # where, not multiply: a -inf log-prob at a masked position must contribute 0, not NaN.
    nll = torch.where(mask, -token_logps, torch.zeros_like(token_logps))
    losses = nll.sum(dim=-1)
    units = mask.sum(dim=-1).float()
    mean_nll = losses.detach() / units.clamp(min=1.0)
    return ObjectiveOutput(losses=losses, units=units, metrics={"nll": mean_nll})

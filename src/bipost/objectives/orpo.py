"""ORPO (Hong et al. 2024): NLL of the chosen response plus an odds-ratio preference term.

Inputs are, per preference pair, the **summed** response log-probs and the response token
counts of the chosen and rejected sequences (``sequence_logprobs``). With the token mean
``m = sum / count`` the paper's length-normalized likelihood is ``p = exp(m)``, its odds
``p / (1 - p)`` and

    log odds(y) = m - log(1 - exp(m)),    lor = log odds(y_c) - log odds(y_r)

The per-pair loss is ``-m_c + lambda * (-log s(lor))``: the chosen response's mean NLL (the
paper's L_SFT) plus lambda times the odds-ratio loss L_OR (``s`` the logistic sigmoid). No
reference model is involved.

Numerics: ``log(1 - exp(m))`` is computed as ``log1p(-exp(m))`` for ``m < -ln 2`` and as
``log(-expm1(m))`` above (Maechler 2012), each accurate in its range. ``m`` is capped at
``-eps`` (fp32 machine epsilon, ~1.2e-7) inside the log odds only: at ``m = 0`` (every token
predicted with probability 1) the odds are infinite, and a mean log-prob closer to 0 than that
is below what log_softmax resolves anyway. Capped entries get no odds-ratio gradient (the NLL
term still has its own); so the loss and its gradients stay finite from ``m = 0`` down to
``m = -1e4`` and beyond, where ``exp(m)`` underflows to 0 and ``log odds = m``.

Against TRL (``ORPOTrainer``, ``trl.experimental.orpo``): TRL's ``beta`` is this ``lambda`` (the
loss is ``nll - beta * mean(log s(lor))``); its NLL is a token mean over the whole batch and,
for decoder-only models, over prompt *and* response tokens, while here it is each pair's mean
over its response tokens (the prompt is never trained on, as in bipost's SFT), averaged over
pairs like the odds-ratio term (one unit per pair). TRL's ``log1mexp`` has no cap at 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bipost.objectives.base import ObjectiveOutput
from bipost.objectives.simpo import length_normalized_logps

_MEAN_LOGP_CAP = -torch.finfo(torch.float32).eps
"""Largest token-mean log-prob the log odds see (see the module docstring)."""


def check_orpo_args(*, lambda_: float) -> None:
    """The one check of ORPO's setting (the loss and the ``orpo`` kind's config use it)."""
    if not (math.isfinite(lambda_) and lambda_ >= 0):
        raise ValueError(f"lambda must be >= 0, got {lambda_}")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate over the whole range (Maechler 2012)."""
    # Both branches are finite for x < 0, so torch.where's unused branch adds no NaN gradient.
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 - p))`` of ``p = exp(mean_logps)``, with ``mean_logps`` capped at ``-eps``."""
    m = mean_logps.clamp(max=_MEAN_LOGP_CAP)
    return m - log1mexp(m)


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    chosen_counts: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    rejected_counts: torch.Tensor,
    *,
    lambda_: float,
) -> ObjectiveOutput:
    """Per-pair ORPO loss (see the module docstring for the math).

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` summed policy response log-probs.
        chosen_counts, rejected_counts: ``[B]`` response token counts (>= 1), int or float.
        lambda_: weight of the odds-ratio term, the paper's lambda (= TRL's ``ORPOConfig.beta``).

    Returns:
        ``ObjectiveOutput``: ``losses`` ``[B]``, ``units`` ones ``[B]``, metrics (detached
        ``[B]``): ``nll`` (the chosen response's mean NLL), ``log_odds_ratio`` (``lor``),
        ``accuracy`` (``lor > 0``, i.e. ``m_c > m_r``), ``logps_chosen``, ``logps_rejected``
        (the summed log-probs, as ``dpo_loss`` reports them).
    """
    check_orpo_args(lambda_=lambda_)
    if policy_rejected_logps.shape != policy_chosen_logps.shape:
        raise ValueError(
            f"policy_rejected_logps has shape {tuple(policy_rejected_logps.shape)}, "
            f"expected {tuple(policy_chosen_logps.shape)}"
        )
    m_c = length_normalized_logps(policy_chosen_logps, chosen_counts, "orpo chosen")
    m_r = length_normalized_logps(policy_rejected_logps, rejected_counts, "orpo rejected")
    nll = -m_c
    lor = log_odds(m_c) - log_odds(m_r)
    losses = nll - lambda_ * F.logsigmoid(lor)

    with torch.no_grad():
        metrics = {
            "nll": nll.detach(),
            "log_odds_ratio": lor.detach(),
            "accuracy": (lor > 0).float(),
            "logps_chosen": policy_chosen_logps.detach().float(),
            "logps_rejected": policy_rejected_logps.detach().float(),
        }
    units = torch.ones(losses.shape, dtype=torch.float32, device=losses.device)
    return ObjectiveOutput(losses=losses, units=units, metrics=metrics)

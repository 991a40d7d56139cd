"""Direct Preference Optimization (DPO) and IPO on summed response log-probabilities.

All inputs are ``[B]`` **sums** of response-token log-probs (``sequence_logprobs``), one
entry per preference pair. With

    h = (log pi(y_c) - log pi(y_r)) - (log ref(y_c) - log ref(y_r))

the per-pair losses are

* ``sigmoid`` (Rafailov et al. 2023, with cDPO label smoothing eps):
  ``-(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)``
* ``ipo`` (Azar et al. 2023): ``(h - 1 / (2 * beta))**2``. Note: TRL computes IPO on
  per-token *averaged* log-probs; OpenRLHF and the original seed code use *summed* ones.
  We use sums, so ``beta`` for IPO is not interchangeable with TRL's.

Optionally ``nll_coef * chosen_nll`` (per-pair mean NLL of the chosen response, the
"RPO" / DPO+NLL regulariser) is added to each pair's loss.

One unit per pair (``units = 1``), so ``sum(losses) / sum(units)`` is the pair mean.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F

from bipost.objectives.base import ObjectiveOutput


class DPOLoss(str, Enum):
    """Which preference loss ``dpo_loss`` computes (``str`` mixin: compares equal to the value)."""

    SIGMOID = "sigmoid"
    IPO = "ipo"


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str | DPOLoss = DPOLoss.SIGMOID,
    label_smoothing: float = 0.0,
    chosen_nll: torch.Tensor | None = None,
    nll_coef: float = 0.0,
) -> ObjectiveOutput:
    """Per-pair DPO / IPO loss (see the module docstring for the math).

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` summed policy log-probs.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` summed reference log-probs (no grad
            needed; they are detached here).
        beta: inverse temperature, > 0.
        loss_type: ``"sigmoid"`` or ``"ipo"`` (or a :class:`DPOLoss`).
        label_smoothing: cDPO ``eps`` in ``[0, 0.5)``; sigmoid only (must be 0 for IPO).
        chosen_nll: ``[B]`` per-pair **mean** NLL of the chosen response; required iff
            ``nll_coef > 0``.
        nll_coef: weight of ``chosen_nll`` added to each pair's loss, >= 0.

    Returns:
        ``ObjectiveOutput``: ``losses`` ``[B]``, ``units`` ones ``[B]``, metrics (detached
        ``[B]``): ``reward_chosen = beta * (pi_c - ref_c)``, ``reward_rejected =
        beta * (pi_r - ref_r)``, ``margin`` (their difference), ``accuracy``
        (``reward_chosen > reward_rejected``), ``logps_chosen``, ``logps_rejected``.
    """
    try:
        kind = DPOLoss(loss_type)
    except ValueError:
        known = ", ".join(repr(k.value) for k in DPOLoss)
        msg = f"unknown DPO loss_type {loss_type!r}; expected one of {known}"
        raise ValueError(msg) from None
    if not beta > 0:
        raise ValueError(f"DPO beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"DPO label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if kind is DPOLoss.IPO and label_smoothing != 0.0:
        raise ValueError("label_smoothing applies to the sigmoid loss only; set it to 0 for ipo")
    if nll_coef < 0:
        raise ValueError(f"DPO nll_coef must be >= 0, got {nll_coef}")
    if nll_coef > 0 and chosen_nll is None:
        raise ValueError("nll_coef > 0 requires chosen_nll (mean NLL of the chosen response)")
    shape = policy_chosen_logps.shape
    for name, t in (
        ("policy_rejected_logps", policy_rejected_logps),
        ("ref_chosen_logps", ref_chosen_logps),
        ("ref_rejected_logps", ref_rejected_logps),
    ):
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")

    pi_c, pi_r = policy_chosen_logps.float(), policy_rejected_logps.float()
    ref_c, ref_r = ref_chosen_logps.float().detach(), ref_rejected_logps.float().detach()
    h = (pi_c - pi_r) - (ref_c - ref_r)

    if kind is DPOLoss.SIGMOID:
        # logsigmoid is the stable form of log(sigmoid(x)) for large |x|.
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h)
        if label_smoothing > 0:
            losses = losses - label_smoothing * F.logsigmoid(-beta * h)
    else:
        losses = (h - 1.0 / (2.0 * beta)) ** 2

    if nll_coef > 0:
        assert chosen_nll is not None
        if chosen_nll.shape != shape:
            msg = f"chosen_nll has shape {tuple(chosen_nll.shape)}, expected {tuple(shape)}"
            raise ValueError(msg)
        losses = losses + nll_coef * chosen_nll.float()

    with torch.no_grad():
        reward_chosen = beta * (pi_c - ref_c)
        reward_rejected = beta * (pi_r - ref_r)
        metrics = {
            "reward_chosen": reward_chosen,
            "reward_rejected": reward_rejected,
            "margin": reward_chosen - reward_rejected,
            "accuracy": (reward_chosen > reward_rejected).float(),
            "logps_chosen": pi_c.detach(),
            "logps_rejected": pi_r.detach(),
        }
    units = torch.ones(shape, dtype=torch.float32, device=losses.device)
    return ObjectiveOutput(losses=losses, units=units, metrics=metrics)

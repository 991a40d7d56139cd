"""The DPO family on summed response log-probabilities: DPO, cDPO, IPO, hinge, robust DPO, APO.

All inputs are ``[B]`` **sums** of response-token log-probs (``sequence_logprobs``), one
entry per preference pair. With the policy/reference log-ratios of the chosen and rejected
responses

    r_c = log pi(y_c) - log ref(y_c),   r_r = log pi(y_r) - log ref(y_r),   h = r_c - r_r

the per-pair losses (``s`` is the logistic sigmoid) are

* ``sigmoid`` (Rafailov et al. 2023, with cDPO label smoothing eps, Mitchell 2023):
  ``-(1 - eps) * log s(beta * h) - eps * log s(-beta * h)``
* ``ipo`` (Azar et al. 2023): ``(h - 1 / (2 * beta))**2``. Note: TRL computes IPO on
  per-token *averaged* log-probs; OpenRLHF and the original seed code use *summed* ones.
  We use sums, so ``beta`` for IPO is not interchangeable with TRL's.
* ``hinge`` (SLiC, Zhao et al. 2023; with a reference as RSO's "hinge-norm", Liu et al. 2024):
  ``max(0, 1 - beta * h)``. Without a reference (``ref = 0``) this is ``beta`` times SLiC's
  calibration loss ``max(0, delta - (log pi(y_c) - log pi(y_r)))`` with margin ``delta = 1 / beta``.
* ``robust`` (Chowdhury et al. 2024, "Provably Robust DPO"), eps = ``label_smoothing`` read as
  the probability that a pair's label is flipped:
  ``((1 - eps) * l(h) - eps * l(-h)) / (1 - 2 eps)`` with ``l(x) = -log s(beta * x)``. It is
  unbiased: averaged over a flip with probability eps it equals the clean ``l(h)``. Unlike cDPO
  it can be negative.
* ``apo_zero`` (D'Oosterlinck et al. 2024, Anchored Preference Optimization, eq. 7):
  ``s(-beta * r_c) + s(beta * r_r)``: push the chosen likelihood up, the rejected one down.
* ``apo_down`` (ibid., eq. 8): ``s(beta * r_c) + s(-beta * h)``: push the chosen likelihood
  down, the rejected one down more (for chosen outputs worse than the model's own).
  Both APO losses are the paper's up to the constant 1 (as in TRL), so they lie in ``[0, 2]``.

``label_smoothing`` is used by ``sigmoid`` and ``robust`` only (must be 0 for the others).
Optionally ``nll_coef * chosen_nll`` (per-pair mean NLL of the chosen response, the
"RPO" / DPO+NLL regulariser) is added to each pair's loss.

Against TRL (``DPOTrainer``, 1.x): TRL also sums response log-probs (except IPO, above), and
its hinge/robust/apo_zero/apo_down formulas are these; it averages the per-pair losses of a
device batch where bipost divides by the global pair count. Since TRL 0.29 its ``sigmoid``
ignores ``label_smoothing`` (cDPO smoothing is gone there; ``robust`` and ``exo_pair`` use it).

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
    HINGE = "hinge"
    ROBUST = "robust"
    APO_ZERO = "apo_zero"
    APO_DOWN = "apo_down"


_SMOOTHED = (DPOLoss.SIGMOID, DPOLoss.ROBUST)
"""The loss types that read ``label_smoothing`` (cDPO's eps, robust DPO's flip rate)."""


def check_dpo_args(*, beta: float, loss_type: str | DPOLoss, label_smoothing: float, nll_coef: float) -> DPOLoss:
    """The one check of the DPO family's settings (the loss and the ``dpo`` kind's config use it):
    the loss type, or a ``ValueError`` whose message starts with the offending field's name."""
    try:
        kind = DPOLoss(loss_type)
    except ValueError:
        known = ", ".join(k.value for k in DPOLoss)
        raise ValueError(f"loss_type must be one of {known}, not {loss_type!r}") from None
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if kind not in _SMOOTHED and label_smoothing != 0.0:
        raise ValueError(f"label_smoothing applies to the sigmoid and robust losses only; set it to 0 for {kind.value}")
    if nll_coef < 0:
        raise ValueError(f"nll_coef must be >= 0, got {nll_coef}")
    return kind


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
    """Per-pair loss of the DPO family (see the module docstring for the math).

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` summed policy log-probs.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` summed reference log-probs (no grad
            needed; they are detached here).
        beta: inverse temperature, > 0.
        loss_type: ``"sigmoid"``, ``"ipo"``, ``"hinge"``, ``"robust"``, ``"apo_zero"`` or
            ``"apo_down"`` (or a :class:`DPOLoss`).
        label_smoothing: ``eps`` in ``[0, 0.5)``: cDPO smoothing for ``sigmoid``, the label
            flip rate for ``robust``; must be 0 for the other loss types.
        chosen_nll: ``[B]`` per-pair **mean** NLL of the chosen response; required iff
            ``nll_coef > 0``.
        nll_coef: weight of ``chosen_nll`` added to each pair's loss, >= 0.

    Returns:
        ``ObjectiveOutput``: ``losses`` ``[B]``, ``units`` ones ``[B]``, metrics (detached
        ``[B]``): ``reward_chosen = beta * (pi_c - ref_c)``, ``reward_rejected =
        beta * (pi_r - ref_r)``, ``margin`` (their difference), ``accuracy``
        (``reward_chosen > reward_rejected``), ``logps_chosen``, ``logps_rejected``.
    """
    kind = check_dpo_args(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, nll_coef=nll_coef)
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
    r_c, r_r = pi_c - ref_c, pi_r - ref_r
    h = (pi_c - pi_r) - (ref_c - ref_r)

    if kind is DPOLoss.SIGMOID:
        # logsigmoid is the stable form of log(sigmoid(x)) for large |x|.
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h)
        if label_smoothing > 0:
            losses = losses - label_smoothing * F.logsigmoid(-beta * h)
    elif kind is DPOLoss.IPO:
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif kind is DPOLoss.HINGE:
        losses = torch.relu(1.0 - beta * h)
    elif kind is DPOLoss.ROBUST:
        eps = label_smoothing
        losses = (-(1.0 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (
            1.0 - 2.0 * eps
        )
    elif kind is DPOLoss.APO_ZERO:
        # 1 - s(x) is written s(-x): exact, and no cancellation when s(x) is close to 1.
        losses = torch.sigmoid(-beta * r_c) + torch.sigmoid(beta * r_r)
    else:
        losses = torch.sigmoid(beta * r_c) + torch.sigmoid(-beta * h)

    if nll_coef > 0:
        assert chosen_nll is not None
        if chosen_nll.shape != shape:
            msg = f"chosen_nll has shape {tuple(chosen_nll.shape)}, expected {tuple(shape)}"
            raise ValueError(msg)
        losses = losses + nll_coef * chosen_nll.float()

    with torch.no_grad():
        reward_chosen = beta * r_c
        reward_rejected = beta * r_r
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

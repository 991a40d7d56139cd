"""SimPO (Meng et al. 2024): reference-free preference loss on length-normalized log-probs.

Inputs are, per preference pair, the **summed** response log-probs and the response token
counts of the chosen and rejected sequences (``sequence_logprobs``). With the token means
``m = sum / count`` (the paper's ``log pi(y|x) / |y|``) and the margin

    z = beta * (m_c - m_r) - gamma

the per-pair loss is ``-(1 - eps) * log s(z) - eps * log s(-z)`` (``s`` the logistic sigmoid,
``eps`` the optional label smoothing, 0 in the paper). ``beta * m`` is SimPO's implicit reward,
``gamma`` the target reward margin. No reference model is involved.

Conventions elsewhere (so hyper-parameters carry over):

* ``gamma`` here is the paper's gamma, on the reward scale. TRL's ``CPOConfig.simpo_gamma`` is the
  same quantity (TRL subtracts ``simpo_gamma / beta`` inside ``beta * (...)``). The SimPO
  authors' own code takes ``gamma_beta_ratio = gamma / beta`` instead: ``gamma = beta *
  gamma_beta_ratio``.
* TRL runs SimPO inside ``CPOTrainer(loss_type="simpo")``, whose ``cpo_alpha`` (default 1.0) adds
  CPO's NLL term on the chosen response; plain SimPO needs ``cpo_alpha=0``. Here SimPO has no NLL
  term: pair it with an SFT objective instead.
* TRL averages the per-pair losses of a device batch; bipost sums them and divides by the
  global pair count (one unit per pair).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bipost.objectives.base import ObjectiveOutput


def check_simpo_args(*, beta: float, gamma: float, label_smoothing: float) -> None:
    """The one check of SimPO's settings (the loss and the ``simpo`` kind's config use it): a
    ``ValueError`` whose message starts with the offending field's name."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not math.isfinite(gamma):
        raise ValueError(f"gamma must be a finite number, got {gamma}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")


def length_normalized_logps(sums: torch.Tensor, counts: torch.Tensor, name: str) -> torch.Tensor:
    """fp32 token-mean log-probs ``sums / counts``; every count must be >= 1.

    An empty response has no mean log-prob (``0 / 0``); the data layer already skips such rows,
    so one here is a caller bug and fails loudly rather than turning into a NaN loss.
    """
    if sums.shape != counts.shape:
        raise ValueError(
            f"{name}: logps {tuple(sums.shape)} and token counts {tuple(counts.shape)} differ"
        )
    if bool((counts < 1).any()):
        raise ValueError(f"{name}: every response needs >= 1 token, got counts {counts.tolist()}")
    return sums.float() / counts.float()


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    chosen_counts: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    rejected_counts: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> ObjectiveOutput:
    """Per-pair SimPO loss (see the module docstring for the math).

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` summed policy response log-probs.
        chosen_counts, rejected_counts: ``[B]`` response token counts (>= 1), int or float.
        beta: reward scale of the token-mean log-probs (the paper tunes it in 2 to 10).
        gamma: target reward margin, the paper's gamma (= TRL's ``simpo_gamma``).
        label_smoothing: ``eps`` of the cDPO-style smoothed loss (0: the paper's loss).

    Returns:
        ``ObjectiveOutput``: ``losses`` ``[B]``, ``units`` ones ``[B]``, metrics (detached
        ``[B]``): ``reward_chosen = beta * m_c``, ``reward_rejected = beta * m_r``, ``margin``
        (their difference), ``accuracy`` (``margin > 0``), ``logps_chosen``, ``logps_rejected``
        (the summed log-probs, as ``dpo_loss`` reports them).
    """
    check_simpo_args(beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    if policy_rejected_logps.shape != policy_chosen_logps.shape:
        raise ValueError(
            f"policy_rejected_logps has shape {tuple(policy_rejected_logps.shape)}, "
            f"expected {tuple(policy_chosen_logps.shape)}"
        )
    m_c = length_normalized_logps(policy_chosen_logps, chosen_counts, "simpo chosen")
    m_r = length_normalized_logps(policy_rejected_logps, rejected_counts, "simpo rejected")
    z = beta * (m_c - m_r) - gamma
    # logsigmoid is the stable form of log(sigmoid(z)) for large |z|.
    losses = -(1.0 - label_smoothing) * F.logsigmoid(z)
    if label_smoothing != 0.0:
        losses = losses - label_smoothing * F.logsigmoid(-z)

    with torch.no_grad():
        reward_chosen, reward_rejected = beta * m_c, beta * m_r
        metrics = {
            "reward_chosen": reward_chosen,
            "reward_rejected": reward_rejected,
            "margin": reward_chosen - reward_rejected,
            "accuracy": (reward_chosen > reward_rejected).float(),
            "logps_chosen": policy_chosen_logps.detach().float(),
            "logps_rejected": policy_rejected_logps.detach().float(),
        }
    units = torch.ones(losses.shape, dtype=torch.float32, device=losses.device)
    return ObjectiveOutput(losses=losses, units=units, metrics=metrics)

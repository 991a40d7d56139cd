"""Group Relative Policy Optimization (GRPO) and its DAPO / Dr. GRPO variants, on per-token log-probs.

Inputs are laid out as the chunked path of ``modeling.forward`` produces them (``positions()`` +
``response_logprobs``): ``logps`` ``[M]`` are the log-probs of the ``M`` completion tokens of a
micro-batch, and ``seq`` ``[M]`` says which of its ``S`` completions each token belongs to.

**Advantages** (:func:`group_advantages`; Shao et al. 2024). The ``n`` completions sampled for one
prompt form a group; with rewards ``r`` and the group's mean ``mu`` and *unbiased* std ``sigma``
(``torch.std``, as TRL):

* ``scale="group"`` (GRPO): ``A_i = (r_i - mu) / (sigma + epsilon)``,
* ``scale="none"`` (Dr. GRPO, Liu et al. 2025): ``A_i = r_i - mu``.

A group whose rewards are all equal carries no signal: its advantages are exactly 0 (not a
rounding residue of ``r - mu`` divided by ``epsilon``).

**Per-token loss** of token ``t`` of completion ``s``, with ``A = A_s``:

    ratio_t = exp(logp_t - old_t)                (old_t = logp_t.detach() with num_iterations = 1)
    pg_t    = -min(ratio_t * A, clip(ratio_t, 1 - epsilon_low, 1 + epsilon_high) * A)
    k3_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (Schulman's k3 estimator of KL)
    loss_t  = pg_t + beta * k3_t                                  (no ``k3`` at all when beta = 0)

``epsilon_high > epsilon_low`` is DAPO's clip-higher (Yu et al. 2025). With ``old = logp.detach()``
the ratio is 1 in value and ``d ratio = d logp``, so the gradient is REINFORCE with the group
baseline: ``-A * d logp_t`` per token, before normalization.

**Aggregation**, in the reduction contract of ``base.py`` (``losses[s]`` = the completion's loss
summed over its *units*, ``units[s]``; the loop divides the step's sum of losses by its global sum
of units, across micro-batches and ranks). Each variant's unit is chosen so that this global
division gives the variant's exact value over the whole step's batch of ``S`` completions:

* ``grpo`` — unit: **one completion**. ``losses[s] = mean_t loss_t`` (its token mean),
  ``units[s] = 1``; step value ``(1/S) sum_s mean_t loss_{s,t}``.
* ``dapo`` — unit: **one completion token**. ``losses[s] = sum_t loss_t``,
  ``units[s] = |s|``; step value ``sum_{s,t} loss_{s,t} / sum_s |s|`` (token-level).
* ``dr_grpo`` — unit: **one token slot of the maximum completion length** ``L``
  (``max_completion_length``, the generation's ``max_new_tokens``). ``losses[s] = sum_t loss_t``,
  ``units[s] = L``; step value ``sum_{s,t} loss_{s,t} / (S * L)``. (Every completion must be at most
  ``L`` tokens long; not checked on the device, which would cost a host sync.)

A completion with no token (``max_new_tokens = 0`` cannot happen in generation; kept for safety)
contributes 0 and, for ``grpo``, still one unit, as in TRL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch

from bipost.objectives.base import ObjectiveOutput
from bipost.objectives.chunked import segment_count, segment_sum


class GRPOLoss(str, Enum):
    """How per-token losses are aggregated (see the module docstring); ``str`` mixin."""

    GRPO = "grpo"
    DAPO = "dapo"
    DR_GRPO = "dr_grpo"


class AdvantageScale(str, Enum):
    """Whether advantages are divided by the group's reward std."""

    GROUP = "group"
    NONE = "none"


def _choice(enum: type[Enum], value, what: str):
    try:
        return enum(value)
    except ValueError:
        known = ", ".join(repr(k.value) for k in enum)  # type: ignore[attr-defined]
        raise ValueError(f"unknown {what} {value!r}; expected one of {known}") from None


# ---------------------------------------------------------------- advantages
@dataclass
class GroupAdvantages:
    """Group-relative advantages and the group statistics they came from."""

    advantages: torch.Tensor
    """``[G * n]`` float32, one per completion, in the rewards' (prompt-major) order."""
    group_mean: torch.Tensor
    """``[G]`` mean reward of each group."""
    group_std: torch.Tensor
    """``[G]`` unbiased std of each group's rewards (0 for a degenerate group)."""
    degenerate: torch.Tensor
    """``[G]`` bool: all rewards of the group are equal, so its advantages are 0."""


def group_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    *,
    scale: str | AdvantageScale = AdvantageScale.GROUP,
    epsilon: float = 1e-4,
) -> GroupAdvantages:
    """Advantages of ``G`` groups of ``n = num_generations`` completions (see the module docstring).

    Args:
        rewards: ``[G * n]`` rewards, prompt-major: completions ``g * n .. g * n + n - 1`` answer
            prompt ``g`` (the order ``generation.generate`` returns).
        num_generations: ``n`` >= 2 (a group of one has no baseline).
        scale: ``"group"`` (divide by the group std + ``epsilon``) or ``"none"``.
        epsilon: added to the std, >= 0 (TRL's 1e-4).

    Returns:
        :class:`GroupAdvantages`; advantages are exactly 0 in groups with equal rewards.
    """
    kind = _choice(AdvantageScale, scale, "advantage scale")
    if num_generations < 2:
        raise ValueError(f"num_generations must be >= 2 (a group of one has no baseline), got {num_generations}")
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise ValueError(f"advantage epsilon must be a finite number >= 0, got {epsilon}")
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards must be [G * num_generations] with num_generations={num_generations}, "
                         f"got shape {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        bad = int(torch.nonzero(~torch.isfinite(rewards))[0])
        raise ValueError(f"reward {bad} is {rewards[bad].item()}: rewards must be finite")
    grouped = rewards.float().view(-1, num_generations)
    mean = grouped.mean(dim=1)
    degenerate = grouped.amax(dim=1) == grouped.amin(dim=1)
    std = torch.where(degenerate, torch.zeros_like(mean), grouped.std(dim=1))
    centered = grouped - mean[:, None]
    if kind is AdvantageScale.GROUP:
        centered = centered / (std[:, None] + epsilon)
    adv = torch.where(degenerate[:, None], torch.zeros_like(centered), centered)
    return GroupAdvantages(advantages=adv.reshape(-1), group_mean=mean, group_std=std, degenerate=degenerate)


# ---------------------------------------------------------------- units
def grpo_units(loss_type: str | GRPOLoss, completion_lengths: torch.Tensor,
               max_completion_length: int | None = None) -> torch.Tensor:
    """``units[s]`` of each completion under ``loss_type`` (float32 ``[S]``): 1 (``grpo``), its
    token count (``dapo``), or ``max_completion_length`` (``dr_grpo``). The loop's unit count of a
    micro-batch is their sum; :func:`grpo_loss` uses this same function."""
    kind = _choice(GRPOLoss, loss_type, "GRPO loss_type")
    lengths = completion_lengths.float()
    if kind is GRPOLoss.GRPO:
        return torch.ones_like(lengths)
    if kind is GRPOLoss.DAPO:
        return lengths
    if max_completion_length is None or max_completion_length < 1:
        raise ValueError(f"loss_type 'dr_grpo' needs max_completion_length >= 1, got {max_completion_length}")
    return torch.full_like(lengths, float(max_completion_length))


# ---------------------------------------------------------------- loss
def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of ``KL(pi || ref)``: ``exp(d) - d - 1`` with ``d = ref - logp``;
    >= 0, 0 exactly where ``logp == ref`` (value and gradient)."""
    d = ref_logps.detach().float() - logps.float()
    return torch.exp(d) - d - 1.0


def _segment_extreme(values: torch.Tensor, seq: torch.Tensor, num_seqs: int, reduce: str,
                     empty: float) -> torch.Tensor:
    out = torch.full((num_seqs,), empty, dtype=torch.float32, device=values.device)
    return out.scatter_reduce(0, seq, values.float(), reduce=reduce, include_self=False)


def grpo_loss(
    logps: torch.Tensor,
    seq: torch.Tensor,
    num_seqs: int,
    advantages: torch.Tensor,
    *,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str | GRPOLoss = GRPOLoss.GRPO,
    max_completion_length: int | None = None,
) -> ObjectiveOutput:
    """Per-completion GRPO / DAPO / Dr. GRPO loss (see the module docstring for the math).

    Args:
        logps: ``[M]`` log-probs of the completion tokens under the policy (differentiable).
        seq: ``[M]`` int64 completion of each token, in ``[0, num_seqs)``.
        num_seqs: ``S``, the micro-batch's number of completions.
        advantages: ``[S]`` one advantage per completion (:func:`group_advantages`), no grad.
        old_logps: ``[M]`` log-probs of the policy that generated the completions (kept when a
            batch is reused, ``num_iterations > 1``); ``None``: ``logps.detach()`` (ratio 1).
        ref_logps: ``[M]`` reference log-probs; required iff ``beta > 0`` and must be ``None``
            when ``beta == 0`` (then no reference is needed, and none should be computed).
        beta: KL coefficient, >= 0.
        epsilon_low, epsilon_high: the ratio is clipped to ``[1 - epsilon_low, 1 + epsilon_high]``;
            ``epsilon_high=None`` means ``epsilon_low`` (symmetric, PPO/GRPO).
        loss_type: ``"grpo"``, ``"dapo"`` or ``"dr_grpo"``.
        max_completion_length: ``L`` for ``dr_grpo`` (the generation's ``max_new_tokens``).

    Returns:
        ``ObjectiveOutput``: ``losses`` ``[S]`` and ``units`` ``[S]`` per ``loss_type``; metrics
        (detached ``[S]``, per completion, so the loop's average is a mean over completions):
        ``completion_length`` (tokens), ``advantage``, ``ratio`` (token mean), ``ratio_min``,
        ``ratio_max``, ``clip_low`` (fraction of tokens with ``ratio < 1 - epsilon_low`` and
        ``A < 0``: clipped, no gradient), ``clip_high`` (``ratio > 1 + epsilon_high`` and
        ``A > 0``), ``clip_region`` (either), and with ``beta > 0`` ``kl`` (token-mean k3).
    """
    kind = _choice(GRPOLoss, loss_type, "GRPO loss_type")
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    if not 0.0 <= epsilon_low < 1.0:
        raise ValueError(f"GRPO epsilon_low must be in [0, 1), got {epsilon_low}")
    if not (eps_high >= 0.0 and math.isfinite(eps_high)):
        raise ValueError(f"GRPO epsilon_high must be a finite number >= 0, got {eps_high}")
    if not (beta >= 0.0 and math.isfinite(beta)):
        raise ValueError(f"GRPO beta must be a finite number >= 0, got {beta}")
    if beta > 0 and ref_logps is None:
        raise ValueError("GRPO beta > 0 needs ref_logps (the reference's log-probs of the completion tokens)")
    if beta == 0 and ref_logps is not None:
        raise ValueError("GRPO beta = 0 takes no ref_logps: no reference forward is needed, so none should run")
    if logps.dim() != 1 or seq.shape != logps.shape:
        raise ValueError(f"expected logps [M] and seq [M], got {tuple(logps.shape)} and {tuple(seq.shape)}")
    if advantages.shape != (num_seqs,):
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected ({num_seqs},)")
    for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if t is not None and t.shape != logps.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(logps.shape)}")

    logps = logps.float()
    old = logps.detach() if old_logps is None else old_logps.detach().float()
    adv = advantages.detach().float()[seq]
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    kl = None
    if beta > 0:
        assert ref_logps is not None
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl

    summed = segment_sum(per_token, seq, num_seqs)
    lengths = segment_count(seq, num_seqs)
    units = grpo_units(kind, lengths, max_completion_length)
    losses = summed / lengths.clamp(min=1.0) if kind is GRPOLoss.GRPO else summed

    with torch.no_grad():
        r = ratio.detach()
        per_len = lengths.clamp(min=1.0)

        def token_mean(x: torch.Tensor) -> torch.Tensor:
            return segment_sum(x.float(), seq, num_seqs) / per_len

        low = (r < 1.0 - epsilon_low) & (adv < 0)
        high = (r > 1.0 + eps_high) & (adv > 0)
        metrics = {
            "completion_length": lengths,
            "advantage": advantages.detach().float(),
            "ratio": token_mean(r),
            "ratio_min": _segment_extreme(r, seq, num_seqs, "amin", 1.0),
            "ratio_max": _segment_extreme(r, seq, num_seqs, "amax", 1.0),
            "clip_low": token_mean(low),
            "clip_high": token_mean(high),
            "clip_region": token_mean(low | high),
        }
        if kl is not None:
            metrics["kl"] = token_mean(kl.detach())
    return ObjectiveOutput(losses=losses, units=units, metrics=metrics)

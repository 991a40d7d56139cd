"""KTO (Ethayarajh et al. 2024): unpaired binary feedback against a KL reference point.

Each example is one (prompt x, completion y) with a label, desirable or undesirable; inputs are
the **summed** response log-probs of the policy and the reference. With the implied reward
``r = log pi(y|x) - log ref(y|x)`` and the reference point ``z0`` the per-example loss is

    desirable:    w_D * (1 - s(beta * (r - z0)))  =  w_D * s(beta * (z0 - r))
    undesirable:  w_U * (1 - s(beta * (z0 - r)))  =  w_U * s(beta * (r - z0))

(``s`` the logistic sigmoid; the paper's ``lambda_y - v(x, y)``). One unit per example, so the
objective is the mean over examples of these weighted losses, as in the paper and TRL. The
paper suggests weights with ``w_D * n_D / (w_U * n_U)`` in ``[1, 4/3]`` for ``n_D`` desirable and
``n_U`` undesirable examples.

The reference point is ``z0 = max(0, mean KL estimate)``, where the estimate is the mean of
``log pi(y'|x) - log ref(y'|x)`` over *mismatched* pairs: each prompt x with the completion y' of
another example. It is detached: no gradient flows through z0. The training loop computes it
over the **whole optimizer step** before the step's first backward:

1. per micro-batch, ``kto_kl_sums(policy_kl_logps, ref_kl_logps)`` -> ``(sum, count)`` (the
   policy's KL log-probs can be computed under ``torch.no_grad``, since z0 is detached);
2. add the sums and counts over the step's micro-batches, all-reduce both (SUM) across ranks;
3. ``z0 = kto_reference_point(sum, count)``, the same on every rank and micro-batch;
4. per micro-batch, ``kto_loss(..., z0=z0)``.

So z0 depends only on the step's set of mismatched pairs: micro-batch 2 x accumulation 4, 8 x 1
and 2 ranks x 4 give the same z0 and, with the reduction contract, the same update, provided
the mismatched completion of each example is fixed by the data (not by the micro-batch it lands
in). TRL's ``KTOTrainer`` instead averages the KL term over each *device micro-batch* (its
collator pairs each prompt with the next example's completion within that batch), takes the
mean of those per-rank means across ranks, clamps at 0, and recomputes it for every
micro-batch, so its z0 changes with the micro-batch size and accumulation.
"""

from __future__ import annotations

import math

import torch

from bipost.objectives.base import ObjectiveOutput


def check_kto_args(*, beta: float, desirable_weight: float, undesirable_weight: float) -> None:
    """The one check of KTO's settings (the loss and the ``kto`` kind's config use it): a
    ``ValueError`` whose message starts with the offending field's name."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    for name, w in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"{name} must be >= 0, got {w}")
    if desirable_weight == undesirable_weight == 0:
        raise ValueError("desirable_weight and undesirable_weight are both 0: nothing would be trained")


def kto_kl_sums(
    policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of the KL estimates ``log pi(y'|x) - log ref(y'|x)`` of one micro-batch.

    Args:
        policy_kl_logps, ref_kl_logps: ``[K]`` summed response log-probs of the mismatched
            (prompt, completion) pairs under the policy and the reference.

    Returns:
        ``(kl_sum, kl_count)``: detached fp32 scalars on the inputs' device, to be added over
        the step's micro-batches and all-reduced (SUM) across ranks before
        :func:`kto_reference_point`.
    """
    if policy_kl_logps.shape != ref_kl_logps.shape or policy_kl_logps.dim() != 1:
        raise ValueError(
            f"KTO KL log-probs must be two [K] tensors, got {tuple(policy_kl_logps.shape)} and "
            f"{tuple(ref_kl_logps.shape)}"
        )
    with torch.no_grad():
        kl = policy_kl_logps.float() - ref_kl_logps.float()
        count = torch.tensor(float(kl.numel()), dtype=torch.float32, device=kl.device)
        return kl.sum(), count


def kto_reference_point(kl_sum: torch.Tensor, kl_count: torch.Tensor) -> torch.Tensor:
    """``z0 = max(0, kl_sum / kl_count)``, detached; the sum and count cover the whole step."""
    if bool(kl_count <= 0):
        msg = "KTO reference point needs at least one mismatched (prompt, completion) pair"
        raise ValueError(msg)
    return (kl_sum.detach().float() / kl_count.float()).clamp(min=0.0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    z0: torch.Tensor | float,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> ObjectiveOutput:
    """Per-example KTO loss (see the module docstring for the math and for z0).

    Args:
        policy_logps: ``[B]`` summed policy response log-probs.
        ref_logps: ``[B]`` summed reference response log-probs (detached here).
        desirable: ``[B]`` bool, True for a desirable example, False for an undesirable one.
        z0: the step's reference point from :func:`kto_reference_point` (a scalar; detached
            here).
        beta: inverse temperature of the value function.
        desirable_weight, undesirable_weight: the paper's ``lambda_D`` and ``lambda_U``.

    Returns:
        ``ObjectiveOutput``: ``losses`` ``[B]``, ``units`` ones ``[B]``, metrics (detached
        ``[B]``): ``reward`` (``beta * r``), ``desirable`` (1.0 / 0.0, so the loop's mean is the
        desirable fraction), ``accuracy`` (the example is on its label's side of z0:
        ``r > z0`` if desirable, ``r < z0`` if not), ``z0``, ``logps`` (summed policy log-probs).
    """
    check_kto_args(beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    shape = policy_logps.shape
    for name, t in (("ref_logps", ref_logps), ("desirable", desirable)):
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor, got {desirable.dtype}")
    z0 = torch.as_tensor(z0, dtype=torch.float32, device=policy_logps.device).detach()
    if z0.dim() != 0:
        raise ValueError(f"z0 must be a scalar, got shape {tuple(z0.shape)}")

    pi = policy_logps.float()
    r = pi - ref_logps.float().detach()
    # 1 - s(x) is written s(-x): exact, and no cancellation when s(x) is close to 1.
    d = beta * (r - z0)
    losses = torch.where(
        desirable, desirable_weight * torch.sigmoid(-d), undesirable_weight * torch.sigmoid(d)
    )

    with torch.no_grad():
        metrics = {
            "reward": beta * r.detach(),
            "desirable": desirable.float(),
            "accuracy": torch.where(desirable, r > z0, r < z0).float(),
            "z0": z0.expand(shape).clone(),
            "logps": pi.detach(),
        }
    units = torch.ones(shape, dtype=torch.float32, device=losses.device)
    return ObjectiveOutput(losses=losses, units=units, metrics=metrics)

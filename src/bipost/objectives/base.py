"""What every objective returns, and the one reduction contract.

Reduction contract (read this before writing an objective):

* An objective returns, for each example ``i`` of a micro-batch, ``losses[i]`` — the **sum**
  of its loss over the example's *units* — and ``units[i]`` — how many units that is.
  SFT and KD count response tokens (the positions that predict a response token);
  DPO counts one unit per preference pair.
* The loss of an objective at one optimizer step is
  ``sum(losses over every example of the step, on every rank) / sum(units ...)``:
  a token mean for SFT/KD and a pair mean for DPO, over the *global* batch.
* The training loop therefore counts the step's units before the first backward
  (all-reduced across ranks) and back-propagates ``weight * losses.sum() / global_units *
  world_size`` per micro-batch (``world_size`` undoes the gradient averaging of DDP/FSDP).
  So micro-batch 2 x accumulation 4 and micro-batch 8 x accumulation 1 (or 2 ranks x 4)
  give the same update, up to float rounding.
* Per-row weights (``data.weight_key``): example ``i`` with weight ``w_i`` counts ``w_i`` times, in
  the losses *and* in the units: the step's loss is ``sum(w_i * losses_i) / sum(w_i * units_i)``.
  So weight 1 everywhere is no weighting and weight 2 is the row duplicated. The loop applies the
  weights (:meth:`ObjectiveOutput.weighted`); objectives never see them.
* ``losses / units`` is the per-example mean (e.g. the sequence-mean NLL the selector uses; weights
  scale both, so it is the same weighted or not: :func:`per_unit`).
* Weighted units may sum to less than 1 (one pair of weight 0.5): divisors are only guarded against
  0, never clamped to 1, so scaling every weight by the same factor changes nothing.
* ``metrics`` are detached per-example tensors ``[B]``; the loop averages them over all
  examples of the step on all ranks. NaN marks an example a metric does not apply to (it is left
  out of that average).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ObjectiveOutput:
    losses: torch.Tensor
    """Per-example loss summed over the example's units, shape ``[B]``, differentiable."""
    units: torch.Tensor
    """Per-example unit count (tokens for SFT/KD, 1 for DPO), shape ``[B]``, float, no grad."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached per-example metrics, each of shape ``[B]`` (NaN where one does not apply to an example)."""

    def weighted(self, weights: torch.Tensor) -> "ObjectiveOutput":
        """Each example counted ``weights[i]`` times: losses and units scaled, metrics unchanged."""
        w = weights.to(self.losses.device, torch.float32)
        return ObjectiveOutput(self.losses * w, self.units * w, self.metrics)


def per_unit(losses: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """``losses / units`` per example (the example's mean loss; unchanged by its weight), 0 where an
    example has no units. Weighted units can be below 1, so they are not clamped to 1."""
    return losses / torch.where(units > 0, units, torch.ones_like(units))

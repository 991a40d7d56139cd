"""One optimizer step's sums, kept on the device until the step's single all-reduce.

A ``.cpu()`` or ``float()`` per micro-batch would stall the host on every forward (measured as a
fixed per-step cost on GPU), so each objective's loss sum and every metric's ``(sum, count)`` stay
device tensors; :meth:`StepMetrics.reduce` packs them, the tokens and the step's flags (e.g. "a
preemption signal arrived on this rank") into one tensor, all-reduces it once and unpacks it by name.
It runs before the optimizer step, so the step can be skipped when a global loss is not finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bipost.objectives import ObjectiveOutput


@dataclass
class StepSums:
    """A step's sums over every rank."""

    losses: dict[str, float]
    """Objective -> its loss sum over its global units."""
    metrics: dict[str, float]
    """``<objective>/<metric>`` -> its mean over the step's examples that have it (not NaN); NaN when none has."""
    tokens: int
    flags: dict[str, float]
    """Each flag summed over ranks."""


class StepMetrics:
    def __init__(self, device: torch.device):
        self.device = device
        self.loss: dict[str, torch.Tensor] = {}
        """Objective -> sum of its per-example losses (float64)."""
        self.metrics: dict[str, torch.Tensor] = {}
        """``<objective>/<metric>`` -> ``[sum, count]`` over the step's examples (float64)."""
        self.tokens = 0
        """Tokens the step processed on this rank (attention-mask ones)."""
        self.flags: dict[str, float] = {}
        """Per-rank numbers every rank sets (the same names everywhere), summed over ranks."""

    def add(self, name: str, out: ObjectiveOutput) -> None:
        """One micro-batch's output of objective ``name``."""
        loss = out.losses.detach().double().sum()
        self.loss[name] = self.loss[name] + loss if name in self.loss else loss
        for k, v in out.metrics.items():
            key = f"{name}/{k}"
            v = v.detach().double()
            # NaN: the metric does not apply to that example (e.g. a reward function that returned
            # None for it); it is left out of the mean, without a host sync.
            present = ~torch.isnan(v)
            pair = torch.stack([torch.where(present, v, 0.0).sum(), present.sum().double()]).to(self.device)
            self.metrics[key] = self.metrics[key] + pair if key in self.metrics else pair

    def reduce(self, engine, units: dict[str, float]) -> StepSums:
        """The sums over every rank (one all-reduce; every rank calls it with the same objectives,
        metric and flag names); each objective's loss is divided by its global ``units``."""
        names, keys, flags = list(self.loss), sorted(self.metrics), sorted(self.flags)
        parts = [torch.stack([self.loss[n].to(self.device) for n in names]) if names
                 else torch.zeros(0, dtype=torch.float64, device=self.device),
                 torch.tensor([float(self.tokens)] + [self.flags[f] for f in flags], dtype=torch.float64,
                              device=self.device)]
        parts += [self.metrics[k] for k in keys]
        flat = engine.all_reduce_sum(torch.cat(parts)).cpu()
        # Weighted units may sum to less than 1 (e.g. one pair of weight 0.5): only 0 is replaced.
        losses = {n: float(flat[i] / (units[n] if units[n] > 0 else 1.0)) for i, n in enumerate(names)}
        at = len(names)
        tokens = int(flat[at])
        summed = {f: float(flat[at + 1 + j]) for j, f in enumerate(flags)}
        pairs = flat[at + 1 + len(flags):].view(-1, 2)
        metrics = {k: float(s / c) if c > 0 else math.nan for k, (s, c) in zip(keys, pairs)}
        return StepSums(losses, metrics, tokens, summed)

"""A schedule decides, per optimizer step, which objective(s) run and with what weights.

The loop calls ``plan(step, probe)`` before the step and ``observe(step, losses)`` after it, with
the *global* (all-ranks) pre-update loss of every objective that ran. ``probe(names)`` computes
no-grad losses of the named objectives on fresh batches (MAXRIGHT's periodic refresh).
Schedules must be deterministic given their state, so every rank takes the same decision;
randomness comes from a dedicated seeded generator whose state is checkpointed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from bipost.config import ObjectiveConfig, ScheduleConfig

Probe = Callable[[list[str]], dict[str, float]]


@dataclass
class StepPlan:
    weights: dict[str, float]
    """Objective name -> weight of its (global-mean) loss in this step's update."""
    micro_batches: dict[str, int] | None = None
    """Objective name -> micro-batches to draw this step; None: each objective's accumulation count."""
    probed: dict[str, float] = field(default_factory=dict)
    """No-grad losses measured while planning (logged as ``probe/<name>``)."""
    info: dict[str, float] = field(default_factory=dict)
    """The schedule's own diagnostics (logged as ``schedule/<key>``), e.g. MAXRIGHT's gaps."""


class Schedule:
    name = "base"

    def __init__(self, objectives: list[ObjectiveConfig], cfg: ScheduleConfig, max_steps: int,
                 steps_per_pass: dict[str, int] | None = None, accum: dict[str, int] | None = None):
        self.steps_per_pass = steps_per_pass or {}
        """Optimizer steps one pass over each objective's data takes (for epoch-based schedules)."""
        self.accum = accum or {}
        """Micro-batches per optimizer step on one rank, per objective (what the loop draws)."""
        self.names = [o.name for o in objectives]
        self.lambdas = {o.name: o.weight for o in objectives}
        self.objectives = {o.name: o for o in objectives}
        self.cfg = cfg
        self.max_steps = max_steps

    def plan(self, step: int, probe: Probe) -> StepPlan:
        raise NotImplementedError

    def upper_weight(self, step: int) -> float | None:
        """The upper-level objective's weight at ``step`` for bilevel schedules (the data selector
        logs it); None for the others."""
        return None

    def observe(self, step: int, losses: dict[str, float]) -> None:
        """Called after each step with the global pre-update losses of the objectives that ran."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

"""Bilevel (penalty) schedule: every step weighs the upper level u and the lower level 1 - u.

The data selector (``bipost.selector``) trains the model on

    u * f_1(dataset_1 batch) + (1 - u) * mean_i(w_i * l_i)        (w detached, see the selector)

where the first objective is the upper level (the trusted data) and the second the lower level
(the data whose rows are weighted). ``u`` starts at the first objective's lambda and drops by
``schedule.lambda_decay`` after every pass over the lower objective's data, clamped at 0:

    u(step) = max(0, lambda_1 - lambda_decay * (step // steps_per_pass[lower]))

A pass is ``steps_per_pass`` of the lower objective: ``ceil(rows / batch_size)`` optimizer steps.
The seeds decay once per epoch the same way but never clamp (u < 0 would *maximize* the upper
loss). With ``lambda_decay = 0`` this is the ``mix`` schedule of two objectives. An objective
whose weight is 0 in a step (u = 0 or u = 1) does not run in that step.
"""

from __future__ import annotations

from bipost.schedules.base import Schedule, StepPlan


class Bilevel(Schedule):
    """Stateless: u is a function of the step, so resuming needs no saved state."""

    name = "bilevel"

    def __init__(self, objectives, cfg, max_steps, **context):
        super().__init__(objectives, cfg, max_steps, **context)
        if len(self.names) != 2:
            raise ValueError(f"schedule 'bilevel' takes exactly two objectives (upper, lower); got {self.names}")
        self.upper, self.lower = self.names
        self.lam = self.lambdas[self.upper]
        self.decay = cfg.lambda_decay
        per_pass = self.steps_per_pass.get(self.lower)
        if per_pass is None and self.decay > 0:
            raise ValueError("schedule 'bilevel' with lambda_decay > 0 needs steps_per_pass of the lower objective")
        self.per_pass = max(1, per_pass or max_steps)

    def epoch(self, step: int) -> int:
        """Completed passes over the lower objective's data before ``step``."""
        return step // self.per_pass

    def upper_weight(self, step: int) -> float:
        """u at ``step`` (0-based)."""
        return max(0.0, self.lam - self.decay * self.epoch(step))

    def plan(self, step, probe):
        u = self.upper_weight(step)
        return StepPlan({self.upper: u, self.lower: 1.0 - u})

"""Deterministic schedules: single objective, weighted mix, sequential stages."""

from __future__ import annotations

from bipost.schedules.base import Schedule, StepPlan


class Single(Schedule):
    """One objective, every step."""

    name = "single"

    def plan(self, step, probe):
        return StepPlan({self.names[0]: 1.0})


class Mix(Schedule):
    """Every step minimizes sum_i lambda_i f_i: every objective's batches, one update."""

    name = "mix"

    def plan(self, step, probe):
        return StepPlan(dict(self.lambdas))


class Sequential(Schedule):
    """Objectives one after another in one run; objective i gets a lambda_i share of the steps.

    The stage boundaries are fixed from the step budget: objective i runs steps
    [round(L_{i-1} T), round(L_i T)) with L_i the cumulative sum of lambdas in the given order.
    """

    name = "sequential"

    def boundaries(self) -> list[int]:
        acc, out = 0.0, []
        for n in self.names:
            acc += self.lambdas[n]
            out.append(round(acc * self.max_steps))
        out[-1] = self.max_steps
        return out

    def plan(self, step, probe):
        for name, end in zip(self.names, self.boundaries()):
            if step < end:
                return StepPlan({name: 1.0})
        return StepPlan({self.names[-1]: 1.0})

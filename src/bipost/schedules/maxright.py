"""MAXRIGHT: each step runs the objective with the largest weighted gap lambda_i (f_i - f_i*).

Bookkeeping (as in the original, without its bugs):

* ``f_i`` are *stale* values: the objective that just ran gets its pre-update global loss
  (``observe``); every ``max_eval_steps`` steps (and at step 0) every objective is re-evaluated
  without gradients on fresh batches (``probe``).
* ``f_i*`` is ``objectives[i].optimum`` when given. Otherwise it is estimated online as the lowest
  value the run has reached for that objective, measured on an exponential moving average of its
  observations (EMA, factor 0.9) so that one lucky batch cannot drag it down. The estimate only
  decreases and converges to the best loss the joint run attains (an upper bound of the true
  optimum; ``tests/test_schedules.py`` shows it settling). With it, the gap measures how far an
  objective has been pushed back from its best — forgetting.
* Ties (e.g. nothing has been forgotten yet) go to the objective that has run the fewest steps
  relative to its lambda, so an objective that does not conflict still gets trained.
"""

from __future__ import annotations

from bipost.schedules.base import Schedule, StepPlan

EMA = 0.9


class Maxright(Schedule):
    name = "maxright"

    def __init__(self, objectives, cfg, max_steps, steps_per_pass=None):
        super().__init__(objectives, cfg, max_steps, steps_per_pass)
        self.f: dict[str, float] = {}
        self.ema: dict[str, float] = {}
        self.best: dict[str, float] = {}
        self.runs = {n: 0 for n in self.names}
        self.last_gaps: dict[str, float] = {}

    def optimum(self, name: str) -> float:
        given = self.objectives[name].optimum
        return given if given is not None else self.best.get(name, self.f[name])

    def _record(self, name: str, value: float) -> None:
        self.f[name] = value
        self.ema[name] = value if name not in self.ema else EMA * self.ema[name] + (1 - EMA) * value
        self.best[name] = min(self.best.get(name, self.ema[name]), self.ema[name])

    def gaps(self) -> dict[str, float]:
        return {n: self.lambdas[n] * (self.f[n] - self.optimum(n)) for n in self.names}

    def plan(self, step, probe):
        probed = {}
        if step % self.cfg.max_eval_steps == 0 or len(self.f) < len(self.names):
            probed = probe(self.names)
            for n, v in probed.items():
                self._record(n, v)
        gaps = self.gaps()
        self.last_gaps = gaps
        top = max(gaps.values())
        tied = [n for n in self.names if gaps[n] >= top - 1e-12]
        # lambda-balanced tie break; a zero lambda never wins a tie
        pick = min(tied, key=lambda n: (self.runs[n] / self.lambdas[n]) if self.lambdas[n] > 0 else float("inf"))
        return StepPlan({pick: 1.0}, probed=probed)

    def observe(self, step, losses):
        for n, v in losses.items():
            self._record(n, v)
            self.runs[n] += 1

    def state_dict(self):
        return {"f": self.f, "ema": self.ema, "best": self.best, "runs": self.runs}

    def load_state_dict(self, state):
        self.f, self.ema, self.best = dict(state["f"]), dict(state["ema"]), dict(state["best"])
        self.runs = dict(state["runs"])

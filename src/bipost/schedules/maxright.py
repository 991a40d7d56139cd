"""MAXRIGHT: each step runs the objective with the largest weighted gap lambda_i (f_i - f_i*).

Bookkeeping (as in the original, without its bugs):

* ``f_i`` are *stale* values: the objective that just ran gets its pre-update global loss
  (``observe``); at step 0 and every ``max_eval_steps`` steps every objective is re-evaluated
  without gradients on fresh batches (``probe``). Between refreshes an objective that does not
  run keeps its last value.
* With a known optimum (``objectives[i].optimum``, seed flag ``--obj_opt_i``) the gap is the
  original one, ``lambda_i (f_i - f_i*)``.

Without a known optimum, f_i* is estimated online from the run itself:

* ``level_i``: an exponential moving average (factor 0.9 per observation) of objective i's
  observed losses, and ``noise_i``: the same average of ``|f_i - level_i|`` (how much one
  step's loss scatters around it);
* ``f_i* ~ best_i = min_t level_i(t)``: the lowest smoothed loss the run has reached for
  objective i. It only decreases; once the objective's loss stops falling it settles near the
  plateau level (slightly below it by the smoothing's scatter; ``tests/test_schedules.py`` shows
  it settling). It is an upper bound of the true optimum: a joint run is never trained on one
  objective alone;
* the gap is ``lambda_i max(0, f_i - best_i - noise_i)``: how far the objective has been pushed
  back above the best it reached, beyond one step's scatter, i.e. how much it has been
  *forgotten*.

Why not ``f_i - best_i`` unclipped: while an objective improves its fresh value lies below its
lagging smoothed best, its gap turns negative, and the objective with the most room to improve
is never picked (a fast-falling SFT loss starves behind a flat DPO loss). Clipping makes "still
improving" and "flat" both a zero gap.

When no objective has a positive gap (nothing forgotten: all are improving or flat) the step goes
to the objective furthest behind its lambda share of the steps run so far (``runs_i / lambda_i``
smallest; ties to the first), a deterministic version of ALRIGHT's draw. An objective with
lambda 0 never runs.
"""

from __future__ import annotations

from bipost.schedules.base import Schedule, StepPlan

EMA = 0.9
"""Smoothing factor per observation of the level and noise estimates."""


class Maxright(Schedule):
    name = "maxright"

    def __init__(self, objectives, cfg, max_steps, **context):
        super().__init__(objectives, cfg, max_steps, **context)
        self.f: dict[str, float] = {}
        """Stale loss of each objective (last observation or probe)."""
        self.level: dict[str, float] = {}
        self.noise: dict[str, float] = {}
        self.best: dict[str, float] = {}
        self.runs = {n: 0 for n in self.names}
        """Steps each objective has run."""
        self.last_gaps: dict[str, float] = {}

    # ------------------------------------------------------------------ estimates
    def optimum(self, name: str) -> float:
        """f_i*: the configured optimum, else the online estimate (lowest smoothed loss so far)."""
        given = self.objectives[name].optimum
        return given if given is not None else self.best[name]

    def _record(self, name: str, value: float) -> None:
        self.f[name] = value
        if name not in self.level:
            self.level[name], self.noise[name], self.best[name] = value, 0.0, value
            return
        self.noise[name] = EMA * self.noise[name] + (1 - EMA) * abs(value - self.level[name])
        self.level[name] = EMA * self.level[name] + (1 - EMA) * value
        self.best[name] = min(self.best[name], self.level[name])

    def gaps(self) -> dict[str, float]:
        out = {}
        for n in self.names:
            if self.objectives[n].optimum is not None:
                out[n] = self.lambdas[n] * (self.f[n] - self.objectives[n].optimum)
            else:
                out[n] = self.lambdas[n] * max(0.0, self.f[n] - self.best[n] - self.noise[n])
        return out

    # ------------------------------------------------------------------ schedule
    def plan(self, step, probe):
        probed = {}
        if step % self.cfg.max_eval_steps == 0 or len(self.f) < len(self.names):
            probed = probe(self.names)
            for n, v in probed.items():
                self._record(n, v)
        gaps = self.gaps()
        self.last_gaps = gaps
        candidates = [n for n in self.names if self.lambdas[n] > 0]  # weights sum to 1: never empty
        top = max(gaps[n] for n in candidates)
        tied = [n for n in candidates if gaps[n] >= top - 1e-12]
        pick = min(tied, key=lambda n: self.runs[n] / self.lambdas[n])  # lambda-balanced tie break
        info = {f"gap/{n}": g for n, g in gaps.items()}
        info.update({f"f_star/{n}": self.optimum(n) for n in self.names})
        return StepPlan({pick: 1.0}, probed=probed, info=info)

    def observe(self, step, losses):
        for n, v in losses.items():
            self._record(n, v)
            self.runs[n] += 1

    def state_dict(self):
        return {"f": dict(self.f), "level": dict(self.level), "noise": dict(self.noise), "best": dict(self.best),
                "runs": dict(self.runs)}

    def load_state_dict(self, state):
        self.f, self.level, self.noise = dict(state["f"]), dict(state["level"]), dict(state["noise"])
        self.best, self.runs = dict(state["best"]), dict(state["runs"])

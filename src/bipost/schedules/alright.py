"""ALRIGHT: each optimizer step runs exactly one objective, drawn with probability lambda_i."""

from __future__ import annotations

import torch

from bipost.schedules.base import Schedule, StepPlan


class Alright(Schedule):
    """Draws come from a dedicated ``torch.Generator`` seeded with ``schedule.seed`` whose state is
    checkpointed; every rank draws the same sequence (no global RNG is touched, so model dropout
    or data order cannot shift it). With ``per_micro_step`` each micro-batch slot of the step is
    drawn separately (the original implementation's behaviour with accumulation > 1)."""

    name = "alright"

    def __init__(self, objectives, cfg, max_steps, **context):
        super().__init__(objectives, cfg, max_steps, **context)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.probs = torch.tensor([self.lambdas[n] for n in self.names], dtype=torch.float64)
        first = objectives[0]
        # Slots = the first objective's micro-batches per step *on one rank* (what the loop draws).
        self.slots = self.accum.get(first.name) or max(1, (first.batch_size or 1) // (first.micro_batch_size or 1))

    def draw(self) -> str:
        return self.names[int(torch.multinomial(self.probs, 1, generator=self.gen))]

    def plan(self, step, probe):
        if not self.cfg.per_micro_step:
            return StepPlan({self.draw(): 1.0})
        # Per-micro-step: one draw per slot; each objective's weight is its share of the slots, so
        # the step minimizes sum_i (slots_i / slots) f_i over the drawn micro-batches.
        counts: dict[str, int] = {}
        for _ in range(self.slots):
            n = self.draw()
            counts[n] = counts.get(n, 0) + 1
        return StepPlan({n: c / self.slots for n, c in counts.items()}, micro_batches=counts)

    def state_dict(self):
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state):
        self.gen.set_state(state["generator"])

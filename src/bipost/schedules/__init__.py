"""Objective schedules: plug-in strategies, one small class each, selected by ``schedule.name``."""

from bipost.schedules.alright import Alright
from bipost.schedules.bilevel import Bilevel
from bipost.schedules.base import Probe, Schedule, StepPlan
from bipost.schedules.maxright import Maxright
from bipost.schedules.simple import Mix, Sequential, Single

SCHEDULES: dict[str, type[Schedule]] = {
    cls.name: cls for cls in (Single, Sequential, Mix, Alright, Maxright, Bilevel)
}


def make_schedule(objectives, cfg, max_steps: int, steps_per_pass: dict[str, int] | None = None,
                  accum: dict[str, int] | None = None) -> Schedule:
    return SCHEDULES[cfg.name](objectives, cfg, max_steps, steps_per_pass=steps_per_pass, accum=accum)


__all__ = ["SCHEDULES", "Probe", "Schedule", "StepPlan", "make_schedule"]

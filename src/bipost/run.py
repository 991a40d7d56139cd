"""Build and run a training run from its config: the trainer and the step hooks the config turns on
(the bilevel data selector when ``selector.enabled``; benchmarks and generation metrics when
``eval.benchmarks`` or ``eval.generate`` is set), so that ``bipost train``, both seed command
lines and a resumed run all get the same hooks."""

from __future__ import annotations

from bipost.config import RunConfig
from bipost.engine import Engine
from bipost.train.hooks import StepHook
from bipost.train.loop import RunResult, Trainer


def hooks_for(cfg: RunConfig) -> list[StepHook]:
    """The hooks ``cfg`` turns on."""
    hooks: list[StepHook] = []
    if cfg.selector.enabled:
        from bipost.selector import SelectorHook

        hooks.append(SelectorHook(cfg.selector))
    if cfg.eval.enabled:
        from bipost.evaluation import EvalHook

        hooks.append(EvalHook(cfg.eval))
    return hooks


def build_trainer(cfg: RunConfig, engine: Engine | None = None) -> Trainer:
    return Trainer(cfg, engine, hooks_for(cfg))


def train(cfg: RunConfig, engine: Engine | None = None) -> RunResult:
    return build_trainer(cfg, engine).train()

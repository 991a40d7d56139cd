"""Step hooks: the seam for components that act *inside* a step without owning the loop.

The bilevel data selector is one: it re-weights one objective's per-example losses and updates
its own parameters after each optimizer step. A hook never calls ``torch.distributed``; it uses
the trainer's engine (``bind``) for collectives.
"""

from __future__ import annotations

from bipost.objectives import ObjectiveOutput


class StepHook:
    def bind(self, trainer) -> None:
        """Called once the trainer has built its model, engine and objectives."""
        self.trainer = trainer

    def units(self, name: str, batch: dict, default: int) -> int:
        """Loss units this hook makes the batch count for (default: the objective's own)."""
        return default

    def transform(self, name: str, batch: dict, out: ObjectiveOutput) -> ObjectiveOutput:
        """Change a micro-batch's objective output before its backward (e.g. per-row weights)."""
        return out

    def after_step(self, step: int) -> dict:
        """After the optimizer step; returns metrics to log."""
        return {}

    def skipped_step(self, step: int) -> None:
        """Instead of ``after_step`` when the step was skipped (a non-finite loss or gradient norm on
        some rank; the same on every rank): drop what ``transform`` kept of it."""

    def on_end(self) -> None:
        """After the final model is saved."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def hooks_from_config(cfg) -> list[StepHook]:
    """The hooks a run's config turns on (the bilevel data selector when ``selector.enabled``), so
    that ``bipost train``, ``Trainer(cfg)`` and a resumed run all get the same hooks."""
    hooks: list[StepHook] = []
    if cfg.selector.enabled:
        from bipost.selector import SelectorHook

        hooks.append(SelectorHook(cfg.selector))
    return hooks

"""Step hooks: the seam for components that act *inside* a step without owning the loop.

The bilevel data selector is one: it re-weights one objective's per-example losses and updates its
own parameters after each optimizer step. A hook sees a narrow :class:`HookContext` (given once, in
``bind``), never the trainer, and never calls ``torch.distributed`` itself. Whoever builds a run
builds its hooks (``bipost.run``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from bipost.config import ObjectiveConfig
from bipost.data.examples import SFT, ExampleType
from bipost.objectives import ObjectiveOutput


class Collectives(Protocol):
    """What a hook may ask of the engine (every call on every rank)."""

    rank: int
    world_size: int
    is_main: bool
    device: torch.device
    lockstep_forwards: bool
    """Every forward of the model is a collective (FSDP2, ZeRO-3): every rank must run as many."""

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor: ...

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's (picklable) ``obj``, in rank order, on every rank."""
        ...

    def barrier(self) -> None: ...

    def print(self, *args: Any) -> None: ...


@dataclass
class ObjectiveView:
    """What a hook may read about one objective."""

    cfg: ObjectiveConfig
    train: Sequence
    """Its training examples (each with its original ``row_id``)."""
    rows_read: int
    """Rows in its data's training split (before ``max_samples`` and skips)."""
    steps_per_pass: int
    """Optimizer steps one pass over its training examples takes."""
    eval: Sequence = ()
    """Its held-out examples (each with its original ``row_id``)."""
    examples: ExampleType = SFT
    """Their example type (``bipost.data.examples``: its fields, and the reference response generations
    are scored against)."""


@dataclass
class HookContext:
    """A run as a hook sees it."""

    output_dir: Path
    max_steps: int
    comm: Collectives
    objectives: dict[str, ObjectiveView]
    measure: Callable[[str], tuple[torch.Tensor, torch.Tensor]]
    """``measure(name)``: ``(row_ids, per-row mean losses)`` of the objective's next step's batches on
    this rank, without gradients (the model in eval mode), as the loop's probes measure."""
    upper_weight: Callable[[int], float | None]
    """The schedule's upper-level weight at a step (bilevel), None for schedules without one."""
    decode: Callable[[Sequence[int]], str]
    """Token ids -> text (special tokens dropped)."""
    save_model: Callable[[Path], None]
    """Export the model being trained to a folder (every rank calls it: gathering may be collective)."""
    model: Any = None
    """The model being trained, as the engine wrapped it: for inference only (generation, benchmarks)."""
    tokenizer: Any = None
    """The run's tokenizer."""
    log_table: Callable[[str, list, int], None] = lambda key, rows, step: None
    """``log_table(key, rows, step)``: rows (dicts) as a table in the trackers that show tables (wandb)."""


class StepHook:
    def bind(self, ctx: HookContext) -> None:
        """Called once the run's model, engine and objectives exist."""
        self.ctx = ctx

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

    def evaluate(self, step: int, final: bool) -> dict:
        """At each held-out evaluation, after the held-out losses (``final``: the run's last one);
        returns metrics for the evaluation's record. Every rank calls it."""
        return {}

    def on_end(self, step: int) -> None:
        """After the final model is saved (``step``: the steps run)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

"""What an objective kind is: one class, declared in one module, looked up by name.

A kind module (``bipost/kinds/<kind>.py``; ``docs/adding-an-objective.md`` walks through one)
declares, side by side:

* its config: a dataclass extending :class:`bipost.config.ObjectiveConfig` with the kind's own
  fields (one docstring each) and their validation (``check``);
* its data: the example type it trains on (``examples``, or ``examples_for(cfg)`` when a setting
  picks it: which row formats it accepts and how they are encoded, collated and packed) and how many
  loss units a batch holds (``row_units``);
* what frozen model or cached artifact it needs, built in :meth:`Objective.build` and handed to its
  constructor (nothing is attached to it later);
* its loss on a micro-batch (``loss``): model-side log-probs from :class:`~bipost.modeling.forward.Forward`,
  then a pure function of ``bipost.objectives``;
* its name on the seed command lines (``cli_name``) and seed flags.

Config loading, data loading, the run builder and both seed CLIs look kinds up
(``bipost.kinds.get_kind``); none of them switches on kind names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from bipost.config import ObjectiveConfig
from bipost.data.examples import PREF, SFT, ExampleType
from bipost.modeling.forward import Forward
from bipost.objectives.base import ObjectiveOutput

if TYPE_CHECKING:
    from bipost.config import RunConfig
    from bipost.data.load import ObjectiveData
    from bipost.engine import Engine


@dataclass
class StepContext:
    """What ``Objective.prepare`` may use inside a training step."""

    step: int
    """The optimizer step (0-based)."""
    comm: Any
    """The engine's collectives (``all_reduce_sum``, ``rank``, ``world_size``, ``lockstep_forwards``, ...)."""
    to_device: Callable[[dict], dict]


@dataclass
class BuildContext:
    """What a kind may use to build its objective (:meth:`Objective.build`)."""

    run: RunConfig
    tokenizer: Any
    policy: torch.nn.Module
    """The policy as loaded (before the engine wraps it): full weights or a peft model."""
    engine: Engine
    forward: Forward
    data: ObjectiveData
    """This objective's examples (train and eval)."""
    frozen_model: Callable[[str], torch.nn.Module]
    """A frozen model by path: loaded once per run (shared by objectives), in eval mode, placed
    by the engine, with packed attention when the run packs."""
    cache_dir: Path
    """Where cached frozen-model outputs live (``train.cache_dir``)."""

    @property
    def packing(self) -> bool:
        return self.run.train.packing

    @property
    def eval_batch_size(self) -> int | None:
        return self.run.train.eval_batch_size


class Objective:
    """An objective kind (class attributes and classmethods) and, once built, one objective of a run.

    The defaults fit a kind trained on prompt/response examples whose loss unit is a response token.
    """

    kind: ClassVar[str] = ""
    """The name configs use (``objectives.N.kind``)."""
    config_class: ClassVar[type[ObjectiveConfig]] = ObjectiveConfig
    """Its config dataclass."""
    examples: ClassVar[ExampleType] = SFT
    """The example type it trains on (``bipost.data.examples``)."""
    cli_name: ClassVar[str] = ""
    """Its name on the seed command lines (``--obj_N``)."""
    seed_model: ClassVar[str | None] = None
    """The config field the seeds' ``--ref_model`` fills (``reference``, ``teacher``), if any."""
    seed_model_required: ClassVar[bool] = False
    """Whether the seeds' ``--ref_model`` must be given for this kind."""
    measure_name: ClassVar[str] = "loss"
    """What :meth:`measure` is, in plots and tables (``held-out <name> loss``); GRPO: ``-reward``."""

    def __init__(self, cfg: ObjectiveConfig, forward: Forward | None = None, packing: bool = False):
        self.cfg = cfg
        self.forward = forward or Forward()
        self.packing = packing
        """Micro-batches are packed rows (``data.packing``) instead of padded ones."""

    @classmethod
    def build(cls, cfg: ObjectiveConfig, ctx: BuildContext) -> "Objective":
        """The objective with everything it needs (frozen models, caches); default: nothing."""
        return cls(cfg, ctx.forward, ctx.packing)

    @classmethod
    def examples_for(cls, cfg: ObjectiveConfig) -> ExampleType:
        """The example type an objective with config ``cfg`` trains on (what its data is loaded as).
        Default: :attr:`examples`; a kind whose data depends on a setting (``kd`` with
        ``teacher_logprobs: data``) overrides it."""
        return cls.examples

    @property
    def name(self) -> str:
        return self.cfg.name or self.kind

    # ---------------------------------------------------------------- data
    def collate(self, pad_id: int) -> Callable[[list], dict]:
        """Examples -> one micro-batch (packed or padded)."""
        return self.examples.collate_fn(pad_id, self.packing)

    def num_seqs(self, batch: dict) -> int:
        """Sequences in a batch (the rows of a padded batch)."""
        return int(batch["row_ids"].shape[0])

    def row_units(self, batch: dict) -> torch.Tensor:
        """Each example's loss units ``[rows]``, known before the forward (the reduction contract,
        ``objectives/base.py``): its response tokens."""
        rows = int(batch["row_ids"].shape[0])
        if "logp_seq" in batch:  # packed: the sequence of every position that predicts a response token
            return torch.bincount(batch["logp_seq"], minlength=rows).double()
        return (batch["labels"][:, 1:] != -100).sum(1).double()

    def units(self, batch: dict) -> float:
        """Loss units in a batch: the sum of :meth:`row_units`, each example weighted by its per-row
        weight when the batch carries ``weights`` (``data.weight_key``; see ``objectives/base.py``)."""
        units = self.row_units(batch)
        if "weights" in batch:
            units = units * batch["weights"].double()
        return float(units.sum())

    # ---------------------------------------------------------------- the step
    def batches_to_draw(self, count: int) -> int:
        """How many of the step's ``count`` micro-batches to draw from this objective's stream: all of
        them, except for an objective that trains this step on batches it kept from an earlier step
        (GRPO reusing a generation, ``num_iterations > 1``), which draws none, so that its stream
        stays where it is. Every rank must return the same number."""
        return count

    def prepare(self, model, batches: list[dict], step: StepContext) -> list[dict]:
        """The step's micro-batches as the loss takes them, before units are counted. Most kinds
        train on the drawn batches as they are; a kind whose batches depend on the current model
        (completions sampled from the policy) or on the whole step (a statistic over every
        micro-batch of every rank) builds them here. Every rank calls it with the same number of
        batches; collectives go through ``step.comm``."""
        return batches

    def loss(self, model, batch: dict) -> ObjectiveOutput:
        """Per-example losses of one micro-batch under ``model`` (differentiable)."""
        raise NotImplementedError

    def measure(self, model, batch: dict) -> ObjectiveOutput:
        """The objective's no-grad measure on a drawn (or held-out) batch, lower is better: what
        evaluation, MAXRIGHT's probes and the selector read. Default: the loss (the loop runs it
        under ``torch.no_grad`` with the model in eval mode)."""
        return self.loss(model, batch)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """State to resume exactly (e.g. a sampling generator); saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # ---------------------------------------------------------------- the seed command lines
    @classmethod
    def add_seed_args(cls, parser) -> None:
        """Add this kind's own flags to the ``train_bi_objective`` parser (e.g. ``--dpo_beta``)."""

    @classmethod
    def seed_fields(cls, args, pick: Callable[[str, Any], Any]) -> dict:
        """Config fields from this kind's seed flags. ``pick(flag, default)`` is the flag's value for
        this objective (its ``_2`` form for objective 2 when both objectives are of this kind)."""
        return {}


class PairObjective(Objective):
    """A kind trained on preference pairs (``PREF``): the chosen and the rejected sequence of every
    pair go through one forward (``collate_pref``'s rows ``0..n-1`` chosen, ``n..2n-1`` rejected, or
    one packed row sharing each prompt); one loss unit per pair."""

    examples = PREF

    def num_seqs(self, batch: dict) -> int:
        return 2 * int(batch["row_ids"].shape[0])

    def row_units(self, batch: dict) -> torch.Tensor:
        return torch.ones(int(batch["row_ids"].shape[0]), dtype=torch.float64)  # one per pair

    def pair_logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(chosen sums, chosen counts, rejected sums, rejected counts)``, each ``[n]``: the summed
        response log-probs under ``model`` and the response token counts of the batch's pairs."""
        n = int(batch["row_ids"].shape[0])
        sums, counts = self.forward.sequence_logps(model, batch, 2 * n)
        return sums[:n], counts[:n], sums[n:], counts[n:]

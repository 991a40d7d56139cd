"""``dpo``: Direct Preference Optimization and its family (IPO, cDPO, hinge, robust DPO, APO, + NLL) against a
frozen reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from bipost.config import ConfigError, ObjectiveConfig
from bipost.data.examples import PREF
from bipost.data.store import Concat
from bipost.example_cache import ExampleCache, cache_meta, compute_rows, load_or_build
from bipost.kinds.base import BuildContext, PairObjective
from bipost.models import as_reference, is_peft, resolve_dtype
from bipost.objectives import dpo_loss
from bipost.objectives.dpo import DPOLoss, check_dpo_args


@dataclass
class DPOConfig(ObjectiveConfig):
    """A preference objective against a reference model."""

    beta: float = 0.1
    """Inverse temperature of the implicit reward."""
    loss: str = "sigmoid"
    """sigmoid (DPO) | ipo | hinge | robust | apo_zero | apo_down (docs/methods.md)."""
    label_smoothing: float = 0.0
    """Label noise epsilon in [0, 0.5): conservative DPO for sigmoid, the flip rate for robust (other losses: 0)."""
    nll_coef: float = 0.0
    """Coefficient of an extra NLL term on the chosen response (token mean per pair)."""
    reference: Optional[str] = None
    """Reference model path. Unset: the policy's initial weights (with LoRA: the adapter disabled, no second copy)."""
    cache_reference: bool = False
    """Compute the reference log-probs once before training and cache them on disk (keyed by the data, reference model, tokenizer and max_len; a stale cache is rebuilt). No reference model is kept in memory while training."""

    aliases = {"loss_type": "loss"}  # the name of `loss` in earlier versions (saved config.yaml files use it)

    def check(self, where: str) -> None:
        try:
            check_dpo_args(beta=self.beta, loss_type=self.loss, label_smoothing=self.label_smoothing,
                           nll_coef=self.nll_coef)
        except ValueError as e:
            raise ConfigError(f"{where}.{str(e).replace('loss_type', 'loss', 1)}") from None


def _content(e) -> tuple:
    return (e.prompt_ids, e.chosen_ids, e.rejected_ids)


class DPO(PairObjective):
    """Chosen and rejected in one forward; the reference is cached log-probs (``ref_logps`` in the
    batch), a frozen model, or, with LoRA and no separate reference, the policy with its adapter
    disabled. Unit: a preference pair."""

    kind = "dpo"
    config_class = DPOConfig
    cli_name = "DPO"
    seed_model = "reference"
    cfg: DPOConfig

    def __init__(self, cfg: DPOConfig, forward=None, packing: bool = False, *,
                 reference: torch.nn.Module | None = None, ref_cache: ExampleCache | None = None):
        super().__init__(cfg, forward, packing)
        self.reference = reference
        """A frozen reference model; None with a cache or an adapter-disabled LoRA policy."""
        self.ref_cache = ref_cache

    @classmethod
    def build(cls, cfg, ctx: BuildContext):
        ref_path = cfg.reference or ctx.run.model.path
        if cfg.cache_reference:
            # Computed once from a reference loaded only if the cache must be (re)built: the policy's
            # initial weights (or, with LoRA, its base: the same values).
            return cls(cfg, ctx.forward, ctx.packing, ref_cache=_reference_cache(cfg, ctx, ref_path))
        if cfg.reference or not is_peft(ctx.policy):
            return cls(cfg, ctx.forward, ctx.packing, reference=ctx.frozen_model(ref_path))
        return cls(cfg, ctx.forward, ctx.packing)

    def collate(self, pad_id):
        base = super().collate(pad_id)
        return base if self.ref_cache is None else self.ref_cache.attach(base, _put_reference)

    def reference_logps(self, model, batch) -> torch.Tensor:
        """Summed reference log-probs ``[2n]`` (chosen then rejected), without grad."""
        if "ref_logps" in batch:
            return batch["ref_logps"]
        n = self.num_seqs(batch)
        if self.reference is not None:
            with torch.no_grad():
                return self.forward.sequence_logps(self.reference, batch, n)[0]
        with as_reference(self.forward.access.outer_module(model)):
            return self.forward.sequence_logps(model, batch, n)[0]

    def loss(self, model, batch):
        n = batch["row_ids"].shape[0]
        ref = self.reference_logps(model, batch)
        sums, counts = self.forward.sequence_logps(model, batch, 2 * n)
        c = self.cfg
        chosen_nll = -sums[:n] / counts[:n].clamp(min=1) if c.nll_coef > 0 else None
        return dpo_loss(
            sums[:n], sums[n:], ref[:n], ref[n:],
            beta=c.beta, loss_type=c.loss, label_smoothing=c.label_smoothing,
            chosen_nll=chosen_nll, nll_coef=c.nll_coef,
        )

    # ---------------------------------------------------------------- seed command line
    @classmethod
    def add_seed_args(cls, parser):
        g = parser.add_argument_group("DPO (the _2 forms: obj_2's, when both objectives are DPO)")
        for sfx in ("", "_2"):
            g.add_argument(f"--dpo_beta{sfx}", type=float, default=None, help="inverse temperature (default 0.1)")
            g.add_argument(f"--dpo_ipo{sfx}", action="store_true", default=None, help="IPO loss (= --dpo_loss ipo)")
            g.add_argument(f"--dpo_loss{sfx}", choices=[k.value for k in DPOLoss], default=None,
                           help="the DPO family's loss (default sigmoid; docs/methods.md)")
            g.add_argument(f"--dpo_label_smoothing{sfx}", type=float, default=None, help="cDPO epsilon (default 0)")
            g.add_argument(f"--dpo_nll_loss_coef{sfx}", type=float, default=None,
                           help="NLL on the chosen response (default 0)")

    @classmethod
    def seed_fields(cls, args, pick):
        ipo, loss, smoothing = pick("dpo_ipo", False), pick("dpo_loss", None), pick("dpo_label_smoothing", 0.0)
        if ipo and loss not in (None, "ipo"):
            raise ConfigError(f"{pick.flag('dpo_ipo')} and {pick.flag('dpo_loss')} {loss} contradict each other")
        loss = "ipo" if ipo else loss or "sigmoid"
        if smoothing and loss not in ("sigmoid", "robust"):
            raise ConfigError(f"{pick.flag('dpo_ipo') if ipo else pick.flag('dpo_loss') + ' ' + loss} and "
                              f"{pick.flag('dpo_label_smoothing')} contradict each other: label smoothing belongs to "
                              f"the sigmoid (cDPO) and robust losses")
        return {"beta": pick("dpo_beta", 0.1), "loss": loss, "label_smoothing": smoothing,
                "nll_coef": pick("dpo_nll_loss_coef", 0.0)}


def _reference_cache(cfg: DPOConfig, ctx: BuildContext, ref_path: str) -> ExampleCache:
    """The reference's summed log-probs of every train and eval pair, ``[N, 2]`` (chosen, rejected)."""
    examples = Concat(ctx.data.train, ctx.data.eval)  # by position: no Python object per example
    meta = cache_meta(examples, _content, "reference", ref_path, ctx.tokenizer, cfg.data.max_len,
                      str(resolve_dtype(ctx.run.model.dtype)))
    collate = PREF.collate_fn(ctx.tokenizer.pad_token_id, ctx.packing)

    def sums(model, batch):
        n = int(batch["row_ids"].shape[0])
        logps = ctx.forward.sequence_logps(model, batch, 2 * n)[0]
        return {"logps": logps.view(2, n).t()}, torch.arange(n)

    def build():
        return compute_rows(examples, ctx.frozen_model(ref_path), sums, collate,
                            ctx.eval_batch_size or cfg.micro_batch_size, ctx.engine)

    return load_or_build(ctx.cache_dir / f"ref-{cfg.name}.pt", examples, _content, meta, build, ctx.engine,
                         "reference log-probs")


def _put_reference(batch: dict, rows: dict) -> None:
    batch["ref_logps"] = rows["logps"].t().reshape(-1)  # [n, 2] -> chosen..., rejected...

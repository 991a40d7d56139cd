"""The selector as a ``StepHook`` of the one training loop.

Per optimizer step, for the lower-level objective (``selector.objective``):

* ``units``: every *row* is one loss unit, so the loop's global mean over the step is a mean over
  rows (not over tokens): ``(1 - u) * mean_i w_i * l_i``. A row with a data weight ``d_i``
  (``data.weight_key`` / ``weights_file``) is ``d_i`` units and its loss ``d_i w_i l_i``; the
  selector's own step uses the row losses ``l_i`` unweighted.
* ``transform``: the objective's per-row losses become ``w_i.detach() * l_i`` with
  ``l_i = losses_i / units_i`` (the row's sequence-mean NLL for SFT, the pair loss for DPO); the
  detached ``l_i`` are kept with their row ids.
* ``after_step``: the rows of every rank are gathered (``all_reduce_sum``) and the selector
  takes its Adam step on ``mean_i w(logits)_i * l_i`` — the ``l_i`` of the same, pre-update forward.
  If the lower objective did not run in the step (u = 1), its losses are first measured on its next
  batches without gradients (``selector.update_every_step``, the loop's ``measure``). Every ``selector.every_epochs`` passes
  over the lower data, the weights, a summary and (optionally) the model are written to
  ``<output_dir>/<selector.name>/epoch-NNN/``.
* ``on_end``: the final weights and summary in ``<output_dir>/<selector.name>/``.
"""

from __future__ import annotations

import numpy as np
import torch

from bipost.config import SelectorConfig
from bipost.objectives import ObjectiveOutput
from bipost.objectives.base import per_unit
from bipost.selector.outputs import write_summary, write_weights
from bipost.selector.weights import SelectorWeights
from bipost.train.hooks import HookContext, StepHook


class SelectorHook(StepHook):
    """Learns a weight per training row of ``cfg.objective`` (see the module docstring); its state is the
    :class:`SelectorWeights` (logits, Adam, LR schedule), checkpointed with the trainer's state."""

    def __init__(self, cfg: SelectorConfig):
        self.cfg = cfg
        self._ids: list[torch.Tensor] = []
        self._losses: list[torch.Tensor] = []

    # ------------------------------------------------------------------ setup
    def bind(self, ctx: HookContext) -> None:
        super().bind(ctx)
        if self.cfg.objective not in ctx.objectives:
            raise ValueError(f"selector.objective {self.cfg.objective!r} is not one of {list(ctx.objectives)}")
        self.name = self.cfg.objective
        self.run = ctx.objectives[self.name]
        self.weights = SelectorWeights(_row_ids(self.run.train), self.cfg, ctx.max_steps)
        self.per_pass = self.run.steps_per_pass
        self.dir = ctx.output_dir / self.cfg.name
        self._order: np.ndarray | None = None

    @property
    def comm(self):
        return self.ctx.comm

    # ------------------------------------------------------------------ inside the step
    def units(self, name, batch, default):
        if name != self.name:
            return default
        # a row is one unit; a row of data weight d (data.weight_key / weights_file) counts d times
        return float(batch["weights"].sum()) if "weights" in batch else int(batch["row_ids"].shape[0])

    def _stash(self, row_ids: torch.Tensor, per_row: torch.Tensor) -> None:
        self._ids.append(row_ids.detach().cpu())
        self._losses.append(per_row.detach().double().cpu())

    def transform(self, name, batch, out):
        if name != self.name:
            return out
        per_row = per_unit(out.losses, out.units)  # the row's mean loss, whatever its data weight
        self._stash(batch["row_ids"], per_row)
        w = self.weights.weights_of(batch["row_ids"]).to(per_row.device, per_row.dtype)
        units = torch.ones_like(out.units)
        if "weights" in batch:  # data weights scale the row's share of the model's loss, not the selector's
            units = units * batch["weights"].to(units.device, units.dtype)
        return ObjectiveOutput(losses=w * units * per_row, units=units,
                               metrics={**out.metrics, "row_loss": per_row.detach()})

    def _gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's (row id, loss) pairs, in rank order, on every rank."""
        ids = torch.cat(self._ids) if self._ids else torch.zeros(0, dtype=torch.long)
        losses = torch.cat(self._losses) if self._losses else torch.zeros(0, dtype=torch.float64)
        self._ids, self._losses = [], []
        eng = self.comm
        if eng.world_size == 1:
            return ids, losses
        counts = torch.zeros(eng.world_size, dtype=torch.float64)
        counts[eng.rank] = ids.numel()
        counts = eng.all_reduce_sum(counts).cpu().long()
        start = int(counts[:eng.rank].sum())
        buf = torch.zeros(2, int(counts.sum()), dtype=torch.float64)
        buf[0, start:start + ids.numel()] = ids.double()  # exact: row ids < 2**53
        buf[1, start:start + ids.numel()] = losses
        buf = eng.all_reduce_sum(buf).cpu()
        return buf[0].round().long(), buf[1]

    def after_step(self, step):
        if not self._ids and self.cfg.update_every_step:
            self._stash(*self.ctx.measure(self.name))
        ids, losses = self._gather()
        metrics: dict = {}
        if ids.numel():
            stats = self.weights.step(ids, losses)
            w = self.weights.weights()
            metrics = {f"selector/{k}": v for k, v in stats.items()}
            metrics.update({"selector/row_loss": float(losses.mean()), "selector/w_min": float(w.min()),
                            "selector/w_max": float(w.max()), "selector/w_std": float(w.std())})
        u = self.ctx.upper_weight(step)
        if u is not None:
            metrics["selector/u"] = u
        self._epoch_outputs(step)
        return metrics

    def _epoch_outputs(self, step: int) -> None:
        """Every ``selector.every_epochs`` passes over the lower data: weights, summary (and model)."""
        every = self.cfg.every_epochs * self.per_pass
        if every and (step + 1) % every == 0:
            epoch = (step + 1) // self.per_pass
            self._write(self.dir / f"epoch-{epoch:03d}", step + 1, model=self.cfg.save_epoch_models)

    def skipped_step(self, step) -> None:
        # a skipped (non-finite) step: its rows' losses must not reach the selector's Adam; the
        # epoch's outputs are still written (the weights of the steps that counted)
        self._ids, self._losses = [], []
        self._epoch_outputs(step)

    def on_end(self, step: int) -> None:
        self._write(self.dir, step, model=False)  # the model is the run's final/
        self.comm.print(f"[selector] weights of {len(self.weights)} rows of '{self.name}' in {self.dir}")

    # ------------------------------------------------------------------ outputs
    def meta(self, step: int) -> dict:
        data = self.run.cfg.data
        return {"objective": self.name, "kind": self.run.cfg.kind, "data_path": data.path, "split": data.split,
                "rows_read": self.run.rows_read, "activation": self.cfg.activation,
                "step": step, "epoch": step / self.per_pass, "steps_per_epoch": self.per_pass}

    def text_of(self, row_id: int) -> dict[str, str]:
        """A row's text as the model saw it (decoded tokens)."""
        ids = _row_ids(self.run.train)
        if self._order is None:
            self._order = np.argsort(ids, kind="stable")
        at = self._order[np.searchsorted(ids, row_id, sorter=self._order)]
        e = self.run.train[int(at)]
        dec = self.ctx.decode
        if hasattr(e, "chosen_ids"):
            return {"prompt": dec(e.prompt_ids), "chosen": dec(e.chosen_ids), "rejected": dec(e.rejected_ids)}
        return {"prompt": dec(e.prompt_ids), "response": dec(e.response_ids)}

    def _write(self, folder, step: int, model: bool) -> None:
        if self.comm.is_main:
            table = self.weights.table()
            meta = self.meta(step)
            write_weights(table, folder, self.cfg.formats, meta)
            title = f"selector weights of '{self.name}' after {meta['epoch']:.2f} epochs (step {step})"
            write_summary(table, folder, title, meta, self.cfg.summary_rows, self.text_of)
        if model:  # every rank: gathering a sharded model is collective
            self.ctx.save_model(folder / "model")
        self.comm.barrier()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {"weights": self.weights.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.weights.load_state_dict(state["weights"])


def _row_ids(examples) -> np.ndarray:
    """The examples' row ids: the store view's array, without a Python object per row."""
    ids = getattr(examples, "row_ids", None)
    return np.asarray(ids if ids is not None else [e.row_id for e in examples], dtype=np.int64)

"""The selector's parameters: one fp32 logit per training row, keyed by the row's original id.

Activations (as in the seeds, BiPOST/SEAL):

* ``softmax``: ``w = N * softmax(logits)``, so the mean weight is exactly 1 and the weights only
  say how the step's loss is *shared* between rows. Logits start at 0.1 (any constant gives w = 1).
* ``sigmoid``: ``w = 2 * sigmoid(logits)``, each weight in (0, 2) independently; logits start at
  -1e-4, so every weight starts at 2 * sigmoid(-1e-4) = 0.99995.

The selector has its own Adam (betas 0.9/0.95 by default, no weight decay), LR schedule and
gradient clipping. Its step minimizes ``mean_j w(logits)[row_j] * l_j`` over the rows ``j`` of one
optimizer step (every rank's rows; a row drawn twice counts twice), where ``l_j`` is the row's
detached loss. Every rank feeds it the same gathered rows in the same order, so the selector is
identical on every rank without broadcasting it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from bipost.config import OptimConfig, SelectorConfig

INIT = {"softmax": 0.1, "sigmoid": -1e-4}
"""The seeds' initial logit per activation."""


def activate(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """Weights from logits (differentiable): ``N * softmax`` or ``2 * sigmoid``."""
    if activation == "softmax":
        return logits.numel() * torch.softmax(logits, dim=0)
    if activation == "sigmoid":
        return 2.0 * torch.sigmoid(logits)
    raise ValueError(f"unknown selector activation {activation!r} (softmax, sigmoid)")


class SelectorWeights:
    """Logits, optimizer and LR schedule of a selector over the rows ``row_ids`` (unique ids).

    ``total_steps`` is the length of the run (for the LR schedule). Logits live on the CPU in fp32:
    the selector is a vector of one number per row, so its math is cheap and does not depend on
    the accelerator (and so is the same on every rank).
    """

    def __init__(self, row_ids: Sequence[int] | np.ndarray | torch.Tensor, cfg: SelectorConfig, total_steps: int):
        # ``row_ids`` may be an int64 numpy array (e.g. ``ExampleView.row_ids``): no Python int per row.
        ids = torch.from_numpy(np.array(row_ids, dtype=np.int64).reshape(-1))
        if ids.numel() == 0:
            raise ValueError("the selector needs at least one row")
        self.row_ids, order = torch.sort(ids)
        if bool((self.row_ids[1:] == self.row_ids[:-1]).any()):
            raise ValueError("selector row ids must be unique (one logit per original row)")
        self.cfg = cfg
        self.activation = cfg.activation
        init = INIT[cfg.activation] if cfg.init is None else cfg.init
        self.logits = torch.nn.Parameter(torch.full((ids.numel(),), float(init), dtype=torch.float32))
        self.optimizer = torch.optim.Adam([self.logits], lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]),
                                          eps=cfg.eps, weight_decay=0.0)
        from bipost.train.build import lr_lambda  # the model's LR schedule shapes, reused

        shape = OptimConfig(lr=cfg.lr, scheduler=cfg.scheduler, warmup_steps=cfg.warmup_steps,
                            min_lr_ratio=cfg.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(shape, total_steps))
        self._cache: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.row_ids.numel()

    # ------------------------------------------------------------------ lookups
    def positions(self, row_ids: torch.Tensor) -> torch.Tensor:
        """Index of each row id in :attr:`logits`; a ``KeyError`` for an id the selector does not know."""
        row_ids = row_ids.detach().to("cpu", torch.long).reshape(-1)
        pos = torch.searchsorted(self.row_ids, row_ids).clamp(max=len(self) - 1)
        bad = self.row_ids[pos] != row_ids
        if bool(bad.any()):
            raise KeyError(f"row ids {row_ids[bad][:5].tolist()} have no selector weight (not training rows "
                           f"of the selected objective)")
        return pos

    def weights(self) -> torch.Tensor:
        """All current weights (detached), aligned with :attr:`row_ids`."""
        if self._cache is None:
            with torch.no_grad():
                self._cache = activate(self.logits, self.activation)
        return self._cache

    def weights_of(self, row_ids: torch.Tensor) -> torch.Tensor:
        """Current (detached) weights of the given rows, in their order."""
        return self.weights()[self.positions(row_ids)]

    # ------------------------------------------------------------------ the selector step
    def objective(self, row_ids: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """``mean_j w(logits)[row_j] * losses_j``, differentiable in the logits only."""
        pos = self.positions(row_ids)
        w = activate(self.logits, self.activation)[pos]
        return (w * losses.detach().to("cpu", torch.float32)).mean()

    def step(self, row_ids: torch.Tensor, losses: torch.Tensor) -> dict[str, float]:
        """One Adam step on :meth:`objective`; returns the objective value, grad norm and LR used."""
        self.optimizer.zero_grad(set_to_none=True)
        value = self.objective(row_ids, losses)
        value.backward()
        if self.cfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_([self.logits], self.cfg.max_grad_norm))
        else:
            grad_norm = float(self.logits.grad.norm())  # type: ignore[union-attr]
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self._cache = None
        return {"objective": float(value.detach()), "grad_norm": grad_norm, "lr": lr}

    # ------------------------------------------------------------------ results and state
    def ranks(self) -> torch.Tensor:
        """Rank of each row (aligned with :attr:`row_ids`): 1 = highest weight; ties by lower row id."""
        # A stable sort of -w keeps tied rows in row-id order (row_ids are sorted).
        order = torch.sort(-self.weights(), stable=True).indices
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(1, len(self) + 1)
        return ranks

    def table(self) -> dict[str, np.ndarray]:
        """Columns ``row_id`` (int64), ``logit`` / ``weight`` (float64), ``rank`` (int64) as numpy
        arrays, sorted by rank (no Python object per row: 1 M rows are 32 MB)."""
        ranks = self.ranks()
        order = torch.argsort(ranks)
        return {
            "row_id": self.row_ids[order].numpy(),
            "logit": self.logits.detach()[order].double().numpy(),
            "weight": self.weights()[order].double().numpy(),
            "rank": ranks[order].numpy(),
        }

    def state_dict(self) -> dict:
        return {
            "row_ids": self.row_ids.clone(),
            "activation": self.activation,
            "logits": self.logits.detach().clone(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["activation"] != self.activation or not torch.equal(state["row_ids"], self.row_ids):
            raise ValueError(
                "can't resume the selector: the checkpoint's rows or activation differ from this run's "
                f"({len(state['row_ids'])} rows, {state['activation']} vs {len(self)} rows, {self.activation}); "
                "the lower objective's data, its filtering or selector.activation changed"
            )
        with torch.no_grad():
            self.logits.copy_(state["logits"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._cache = None

"""Non-finite steps: detected from values the step already reduces, skipped on every rank, logged, counted.

The loop's one all-reduce per step sums every objective's loss over all ranks, so a NaN / inf loss
on any rank makes the global loss non-finite on every rank; the gradient norm is global already
(DDP averages gradients, FSDP2 / DeepSpeed reduce the norm). The check reads those two values:
no extra collective, no extra host sync. A non-finite step is skipped: no optimizer or LR-scheduler
step, its gradients dropped, the schedule never sees its losses and step hooks are told
(``StepHook.skipped_step``). It is logged with the step, the objective(s) and the row ids of the
examples whose loss was not finite (every row of the step when only the gradient norm was), and
counted (``skipped_steps`` in metrics.jsonl). ``train.max_skipped_steps`` skips in a row stop the
run with :class:`NonFiniteError`: the weights are still those of the last good step, but training on
cannot recover by itself.
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger("bipost")


class NonFiniteError(RuntimeError):
    """The run stopped because of non-finite values (too many skipped steps, or weights to save)."""


class NonFiniteGuard:
    """Per step: :meth:`record` each micro-batch, then :meth:`finite`; on a skip :meth:`skipped`."""

    def __init__(self, max_skipped: int):
        self.max_skipped = max_skipped
        self.consecutive = 0
        self.total = 0
        self._rows: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    # ------------------------------------------------------------------ inside the step
    def record(self, name: str, batch: dict, losses: torch.Tensor) -> None:
        """One micro-batch's row ids and per-row losses (kept by reference: no copy, no sync)."""
        self._rows.append((name, batch["row_ids"], losses.detach()))

    def finite(self, losses: dict[str, float], grad_norm: float | None) -> bool:
        """Whether the step's global losses and gradient norm are all finite (the same on every rank;
        ``grad_norm`` None: not measured, DeepSpeed without a norm, which checks its gradients itself)."""
        ok = all(math.isfinite(v) for v in losses.values()) and (grad_norm is None or math.isfinite(grad_norm))
        if ok:
            self.consecutive = 0
            self._rows.clear()
        return ok

    def skipped(self, step: int, losses: dict[str, float], grad_norm: float | None, engine, applied: bool,
                model=None) -> dict:
        """Log and count a skipped step (every rank calls it); its metrics. Raises
        :class:`NonFiniteError` at ``max_skipped`` skips in a row, or when DeepSpeed applied the step
        and the weights are no longer finite."""
        self.consecutive += 1
        self.total += 1
        loss_bad = any(not math.isfinite(v) for v in losses.values())
        mine = self._bad_rows(every_row=not loss_bad)
        self._rows.clear()
        rows: dict[str, list[int]] = {}
        for part in engine.gather_objects(mine):  # rare path: one object gather
            for name, ids in part.items():
                rows.setdefault(name, []).extend(ids)
        rows = {n: sorted(set(ids)) for n, ids in rows.items()}
        bad = [n for n, v in losses.items() if not math.isfinite(v)] or list(losses)
        what = f"loss {', '.join(f'{n}={losses[n]}' for n in bad)}" if loss_bad else f"gradient norm {grad_norm}"
        message = (f"step {step + 1}: non-finite {what}; objective(s) {', '.join(bad)}; rows "
                   f"{'; '.join(f'{n}: {ids}' for n, ids in rows.items())}")
        if applied:  # DeepSpeed stepped anyway (its own overflow check is off): are the weights still finite?
            poisoned = engine.nonfinite_parameters(model)
            if poisoned:
                raise NonFiniteError(f"{message}; DeepSpeed applied the step and these weights are no longer "
                                     f"finite: {poisoned[:8]}")
        if engine.is_main:
            log.warning("[skip] %s: optimizer step skipped (%d in a row, %d in all)", message, self.consecutive,
                        self.total)
        if self.consecutive >= self.max_skipped:
            raise NonFiniteError(
                f"{self.consecutive} steps in a row had a non-finite loss or gradient norm "
                f"(train.max_skipped_steps={self.max_skipped}); last at {message}. The weights are those of "
                f"step {step + 1 - self.consecutive}. Check those rows, lower optim.lr, or train in a wider dtype")
        return {"skipped": True, "skipped_rows": rows}

    def _bad_rows(self, every_row: bool) -> dict[str, list[int]]:
        """This rank's row ids (per objective) whose loss is not finite, or all of its rows
        (``every_row``: every global loss was finite, only the gradient norm was not)."""
        rows: dict[str, list[int]] = {}
        for name, ids, losses in self._rows:
            ids = ids.detach().cpu()
            if not every_row:
                ids = ids[~torch.isfinite(losses.detach().float().cpu())]
            if ids.numel():
                rows.setdefault(name, []).extend(ids.tolist())
        return rows

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive = state.get("consecutive", 0)
        self.total = state.get("total", 0)

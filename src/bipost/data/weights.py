"""Per-row loss weights of an objective's training rows (``data.weight_key``, ``data.weights_file``).

How a weight counts is the reduction contract's (``objectives/base.py``): example ``i`` with weight
``w_i`` contributes ``w_i * losses_i`` to its objective's loss sum and ``w_i * units_i`` to the
step's unit count, so the step's loss is ``sum_i w_i losses_i / sum_i w_i units_i`` over every
example of every micro-batch on every rank. Weight 1 everywhere is no weighting, weight 2 is the
row duplicated, and scaling every weight by the same factor changes nothing.

Where weights come from:

* ``data.weight_key``: a numeric column of the rows. It is read while the token store is built
  (:func:`row_weight`, in the builder's workers) and kept in the store as the per-example
  auxiliary column ``weight`` (float64, 8 bytes a row), so ``weight_key`` is part of the store's
  key (a store built without it is not touched) and a cached run reads no raw row again.
* ``data.weights_file``: a selector's weights file (``bipost select train``) joined on the original
  row id when the data is loaded. It changes weights, never tokens, so the store is not rebuilt
  for another file. A training row the file does not list gets ``data.missing_weight``, or is an
  error naming it (the file was learned on other rows: another hold-out, other data).
* Both: their product.

Rules: a weight is a finite number >= 0; a missing column, a null, a bool, a string (except a CSV
cell, whose every value is text) or a negative / non-finite value is a :class:`DataError` naming
the file, the row and the field. A training row of weight 0 is left out when the data is loaded
(never drawn, no compute spent): the same as the row absent. Held-out (eval) rows are never
weighted: evaluation reports the plain per-unit mean, comparable between weighted and unweighted runs.

Batches carry the weights as ``batch["weights"]`` (float64 ``[rows]``, one per example: a pair for
preference data), looked up by ``batch["row_ids"]`` in a wrapper around the objective's collate
(:meth:`RowWeights.attach`): one mechanism for every example type, padded or packed.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from bipost.config import DataConfig
from bipost.data.sources import DataError, Row

WEIGHT_COLUMN = "weight"
"""Name of the token store's auxiliary per-example column holding ``data.weight_key``'s weights."""


def row_weight(row: Row, key: str) -> float:
    """The weight in ``row[key]``: a finite number >= 0 (a numeric string only in a CSV file)."""
    if key not in row.data:
        raise DataError(f"{row.where()}: missing weight column '{key}' (data.weight_key; the row has keys "
                        f"{sorted(row.data)})")
    value = row.data[key]
    if isinstance(value, str) and row.source.lower().endswith(".csv"):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        shown = "null" if value is None else f"{type(value).__name__} {value!r}"[:80]
        raise DataError(f"{row.where()}, field '{key}': the weight must be a number >= 0, not {shown}")
    weight = float(value)
    if not math.isfinite(weight) or weight < 0:
        raise DataError(f"{row.where()}, field '{key}': the weight must be a finite number >= 0, not {value!r}")
    return weight


def file_weights(cfg: DataConfig, row_ids: np.ndarray) -> np.ndarray:
    """``data.weights_file``'s weights of the rows ``row_ids`` (float64, same order)."""
    from bipost.selector.outputs import find_weights_file, read_weights

    try:
        path = find_weights_file(cfg.weights_file)  # type: ignore[arg-type]
        table, _ = read_weights(path)
    except (OSError, ValueError) as e:
        raise DataError(f"data.weights_file: {e}") from e
    ids, weights = table["row_id"], table["weight"]
    bad = ~np.isfinite(weights) | (weights < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: row_id {int(ids[i])} has weight {float(weights[i])}; weights must be finite and >= 0")
    order = np.argsort(ids, kind="stable")
    ids, weights = ids[order], weights[order]
    if len(ids) > 1 and (np.diff(ids) == 0).any():
        dup = int(ids[1:][np.diff(ids) == 0][0])
        raise DataError(f"{path}: row_id {dup} is listed twice")
    want = np.asarray(row_ids, dtype=np.int64)
    at = np.searchsorted(ids, want).clip(max=max(len(ids) - 1, 0))
    found = (ids[at] == want) if len(ids) else np.zeros(len(want), bool)
    out = np.where(found, weights[at] if len(ids) else 0.0, np.nan)
    if not found.all():
        if cfg.missing_weight is None:
            missing = want[~found]
            raise DataError(
                f"{path} has no weight for {len(missing)} training row(s) of '{cfg.path}' (row ids "
                f"{missing[:5].tolist()}{' ...' if len(missing) > 5 else ''}): it was learned on other rows "
                f"(another eval hold-out or other data). Set data.missing_weight (e.g. 1.0) to weigh them")
        out[~found] = cfg.missing_weight
    return out


def training_weights(cfg: DataConfig, stored: Optional[np.ndarray], row_ids: np.ndarray) -> Optional[np.ndarray]:
    """The weights of the training examples with ``row_ids`` (``stored``: their ``weight_key``
    weights from the store), or None when the data has no weights."""
    weights = None if stored is None else np.asarray(stored, dtype=np.float64)
    if cfg.weights_file:
        from_file = file_weights(cfg, row_ids)
        weights = from_file if weights is None else weights * from_file
    return weights


class RowWeights:
    """The training examples' weights by original row id (unique within one training split)."""

    def __init__(self, row_ids: np.ndarray, weights: np.ndarray):
        order = np.argsort(row_ids, kind="stable")
        self.ids = np.asarray(row_ids, dtype=np.int64)[order]
        self.weights = np.asarray(weights, dtype=np.float64)[order]

    def of(self, row_ids: torch.Tensor) -> torch.Tensor:
        """float64 ``[rows]``: the weights of ``row_ids`` (a ``KeyError`` for a row without one)."""
        want = row_ids.cpu().numpy().astype(np.int64)
        at = np.searchsorted(self.ids, want).clip(max=max(len(self.ids) - 1, 0))
        if not len(self.ids) or not np.array_equal(self.ids[at], want):
            raise KeyError(f"rows {want.tolist()[:5]} have no weight: they are not training rows of this data")
        return torch.from_numpy(self.weights[at].copy())

    def attach(self, collate: Callable[[list], dict]) -> Callable[[list], dict]:
        """``collate`` whose batches also carry ``weights`` (float64 ``[rows]``) of their ``row_ids``."""

        def weighted(examples: list) -> dict:
            batch = collate(examples)
            batch["weights"] = self.of(batch["row_ids"])
            return batch

        return weighted

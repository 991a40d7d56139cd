"""One objective's data, end to end: rows → capped/split rows → text parts → token-space examples.

Order of operations (each keeps the rows' original ``row_id``):

1. read the split (:func:`bipost.data.sources.load_split`);
2. ``max_samples``: keep the first rows;
3. eval rows: ``eval_split`` if set (its own row ids, first ``max_eval_samples`` rows), else
   ``round(eval_fraction * n)`` of the capped rows held out at random (generator seeded with
   ``cfg.seed``; never in training). ``max_eval_samples`` keeps a random subset of the held-out
   rows; the rest are *not* returned to training, so the training set does not depend on it;
4. format (the format of ``auto`` is decided from the first training row) and tokenize;
   skipped rows are counted by reason.

A :class:`LoadSummary` of all this is logged on the ``bipost`` logger at INFO.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import torch

from bipost.config import DataConfig
from bipost.data.examples import ExampleType, example_type
from bipost.data.formats import PrefText, SFTText, format_row, resolve_format
from bipost.data.sources import DataError, Row, load_split
from bipost.data.tokenize import TokenPolicy
from bipost.data.types import PrefExample, SFTExample

logger = logging.getLogger("bipost")

Example = Union[SFTExample, PrefExample]


@dataclass
class LoadSummary:
    """What loading did: rows read, examples kept, and why rows were skipped."""

    path: str
    split: str
    kind: str
    """What the rows are for: the objective's name, or the example type."""
    format: str = ""
    rows_read: int = 0
    """Rows in the training split."""
    rows_used: int = 0
    """Rows after ``max_samples``."""
    eval_from: str = ""
    """Where eval rows came from: ``"split 'test'"``, ``"held out 10%"`` or ``""`` (no eval)."""
    eval_rows: int = 0
    """Eval rows before formatting (after ``max_eval_samples``)."""
    train_kept: int = 0
    eval_kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    """Training rows skipped, by reason."""
    eval_skipped: Counter = field(default_factory=Counter)
    """Eval rows skipped, by reason."""
    truncated: int = 0
    """Training examples whose response (either side of a pair) was cut to ``max_len``."""
    max_len: int = 0

    @property
    def train_rows(self) -> int:
        """Rows that went into training (before skipping)."""
        return self.train_kept + sum(self.skipped.values())

    def __str__(self) -> str:
        def reasons(c: Counter) -> str:
            return ", ".join(f"{reason}: {n}" for reason, n in c.most_common())

        text = f"data '{self.path}' [{self.split}] for {self.kind} as {self.format}: read {self.rows_read} rows"
        if self.rows_used != self.rows_read:
            text += f" (first {self.rows_used} used, max_samples)"
        if self.eval_from:
            text += f", {self.eval_rows} eval rows from {self.eval_from}"
        text += f"; kept {self.train_kept} training"
        text += f" and {self.eval_kept} eval examples" if self.eval_from else " examples"
        if self.skipped:
            text += f"; skipped {sum(self.skipped.values())} training rows ({reasons(self.skipped)})"
        if self.eval_skipped:
            text += f"; skipped {sum(self.eval_skipped.values())} eval rows ({reasons(self.eval_skipped)})"
        if self.truncated:
            text += f"; {self.truncated} training responses truncated to max_len={self.max_len}"
        return text + "."


@dataclass
class ObjectiveData:
    """Token-space examples of one objective, and how they were obtained."""

    train: list[Example]
    eval: list[Example]
    summary: LoadSummary
    examples: ExampleType
    """Their example type."""
    pad_id: int = 0
    """Padding id to collate with (the tokenizer's pad id, else its EOS id)."""

    def collate(self, examples: Sequence[Example]) -> dict:
        """Padded micro-batch of ``examples`` with :attr:`pad_id`."""
        return self.examples.collate(examples, self.pad_id)


def _hold_out(rows: list[Row], cfg: DataConfig) -> tuple[list[Row], list[Row]]:
    """(train rows, eval rows): a seeded random ``eval_fraction`` of ``rows``, in row order."""
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise ValueError(f"data.eval_fraction must be in [0, 1), got {cfg.eval_fraction}")
    n_eval = round(cfg.eval_fraction * len(rows))
    if cfg.eval_fraction > 0 and n_eval == 0:
        logger.warning("data '%s': eval_fraction=%s of %d rows holds out no row", cfg.path, cfg.eval_fraction, len(rows))
    if n_eval == 0:
        return rows, []
    if n_eval >= len(rows):
        raise DataError(f"data '{cfg.path}': eval_fraction={cfg.eval_fraction} of {len(rows)} rows leaves none to train on")
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    held = perm[:n_eval]
    if cfg.max_eval_samples is not None:
        held = held[: cfg.max_eval_samples]  # a random subset, since ``perm`` is random
    train_pos = sorted(perm[n_eval:])
    return [rows[i] for i in train_pos], [rows[i] for i in sorted(held)]


def _examples(rows: list[Row], fmt: str, cfg: DataConfig, etype: ExampleType, policy: TokenPolicy,
              skipped: Counter, counts: Counter) -> list[Example]:
    items: list[tuple] = []
    for row in rows:
        text = format_row(row, fmt, cfg, policy.tokenizer)
        if isinstance(text, str):
            skipped[text] += 1
        elif isinstance(text, PrefText):
            items.append((row.row_id, text.prompt, text.chosen, text.rejected))
        else:
            assert isinstance(text, SFTText)
            items.append((row.row_id, text.prompt, text.response))
    out: list[Example] = []
    for result in etype.encode(items, policy, cfg.max_len, counts):
        if isinstance(result, str):
            skipped[result] += 1
        else:
            out.append(result)
    return out


def _all_skipped(what: str, n: int, skipped: Counter, cfg: DataConfig) -> DataError:
    top = ", ".join(f"{reason} ({count})" for reason, count in skipped.most_common(3))
    return DataError(
        f"data '{cfg.path}': all {n} {what} rows were skipped; top reasons: {top}. "
        f"Check data.format and the *_key fields, or data.max_len={cfg.max_len}."
    )


def load_objective_data(cfg: DataConfig, examples: ExampleType | str, tokenizer: Any,
                        objective: str = "") -> ObjectiveData:
    """Load, split, format and tokenize one objective's data (see the module doc).

    ``examples`` is the example type (``data.examples``: ``"sft"`` → :class:`SFTExample`, ``"pref"``
    → :class:`PrefExample`); ``objective`` names the objective in messages.
    Raises :class:`DataError` for bad data or when every training (or eval) row is skipped.
    """
    etype = example_type(examples)
    kind = objective or etype.name
    if not cfg.path:
        raise DataError("data.path is empty: set it to a file, a folder or a Hugging Face dataset name")
    if cfg.max_samples is not None and cfg.max_samples < 1:
        raise ValueError(f"data.max_samples must be >= 1 or unset, got {cfg.max_samples}")
    policy = TokenPolicy.of(tokenizer)
    summary = LoadSummary(path=cfg.path, split=cfg.split, kind=kind, max_len=cfg.max_len)

    rows = load_split(cfg.path, cfg.split)
    summary.rows_read = len(rows)
    if cfg.max_samples is not None:
        rows = rows[: cfg.max_samples]
    summary.rows_used = len(rows)
    if not rows:
        raise DataError(f"data '{cfg.path}': split '{cfg.split}' has no rows")

    if cfg.eval_split:
        if cfg.eval_fraction:
            logger.warning("data '%s': eval_split is set, so eval_fraction=%s is ignored", cfg.path, cfg.eval_fraction)
        train_rows = rows
        eval_rows = load_split(cfg.path, cfg.eval_split)
        if cfg.max_eval_samples is not None:
            eval_rows = eval_rows[: cfg.max_eval_samples]
        summary.eval_from = f"split '{cfg.eval_split}'"
    else:
        train_rows, eval_rows = _hold_out(rows, cfg)
        if eval_rows:
            summary.eval_from = f"held out {cfg.eval_fraction:g} of the rows"
    summary.eval_rows = len(eval_rows)

    who = f"objective '{objective}'" if objective else f"{etype.name} examples"
    summary.format = fmt = resolve_format(cfg, rows[0], etype, who=who)
    counts: Counter = Counter()
    train = _examples(train_rows, fmt, cfg, etype, policy, summary.skipped, counts)
    summary.truncated = counts["truncated"]
    evals = _examples(eval_rows, fmt, cfg, etype, policy, summary.eval_skipped, Counter())
    summary.train_kept, summary.eval_kept = len(train), len(evals)
    if not train:
        raise _all_skipped("training", len(train_rows), summary.skipped, cfg)
    if eval_rows and not evals:
        raise _all_skipped("eval", len(eval_rows), summary.eval_skipped, cfg)
    logger.info("%s", summary)
    return ObjectiveData(train=train, eval=evals, summary=summary, examples=etype, pad_id=policy.pad_id)

"""One objective's data, end to end: rows → capped/split rows → text parts → token-space examples.

Order of operations (each keeps the rows' original ``row_id``):

1. read the split (:func:`bipost.data.sources.iter_chunks`), stopping after ``max_samples`` rows;
2. format (the format of ``auto`` is decided from the split's first row) and tokenize every
   row read, into a token store (``data/store.py``) cached under ``data.cache_dir``
   (``data/cache.py``; built by one process in ``data.num_proc`` workers, ``data/build.py``);
   skipped rows are recorded with their reason;
3. eval rows: ``eval_split`` if set (its own row ids and store, first ``max_eval_samples`` rows),
   else ``round(eval_fraction * n)`` of the ``n`` rows read held out at random (generator seeded
   with ``cfg.seed``; never in training). ``max_eval_samples`` keeps a random subset of the
   held-out rows; the rest are *not* returned to training, so the training set does not depend on
   it. The split is a choice of store rows, so it needs no rebuild when these settings change.
4. per-row weights of the training rows (``data.weight_key``, kept in the store;
   ``data.weights_file``, joined on row ids here): rows of weight 0 leave training
   (``data/weights.py``); ``ObjectiveData.weigh`` puts them on the training stream's batches.

``ObjectiveData.train`` / ``.eval`` are :class:`~bipost.data.store.ExampleView` s: sequences of
examples whose token fields are read-only numpy views of the memory-mapped store.
A :class:`LoadSummary` of all this is logged on the ``bipost`` logger at INFO.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from bipost.config import DataConfig
from bipost.data.build import BuildSpec, build_store, default_num_proc
from bipost.data.cache import load_or_build, resolve_cache_dir, source_fingerprint, store_key, tokenizer_fingerprint
from bipost.data.examples import ExampleType, example_type
from bipost.data.formats import resolve_format
from bipost.data.sources import DataError, Split, iter_rows, resolve_split
from bipost.data.store import ExampleView, TokenStore, schema_of, token_dtype, type_name
from bipost.data.tokenize import TokenPolicy
from bipost.data.types import PrefExample, SFTExample
from bipost.data.weights import WEIGHT_COLUMN, RowWeights, training_weights

logger = logging.getLogger("bipost")

Example = Union[SFTExample, PrefExample]

FORMAT_KEYS = ("format", "input_key", "output_key", "input_template", "prompt_key", "completion_key",
               "messages_key", "chosen_key", "rejected_key", "label_key", "max_len")
"""The ``DataConfig`` fields a store's examples depend on (besides the source, split and cap)."""


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
    weighted: str = ""
    """Where the training examples' weights come from (``data.weight_key`` / ``weights_file``), or ``""``."""
    zero_weight: int = 0
    """Training examples left out because their weight is 0."""
    max_len: int = 0
    cache: str = ""
    """``"built"`` when this load tokenized the data (a store was written), ``"cached"`` when it
    only mapped stores that were already there."""
    store: str = ""
    """The training examples' store folder."""

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
        if self.weighted:
            text += f"; training rows weighted by {self.weighted}"
        if self.zero_weight:
            text += f" ({self.zero_weight} of weight 0 left out)"
        if self.cache:
            text += f"; tokens {self.cache} ({self.store})"
        return text + "."


@dataclass
class ObjectiveData:
    """Token-space examples of one objective, and how they were obtained."""

    train: Sequence[Example]
    """Training examples (an :class:`ExampleView` of the store; ``train.row_ids`` is their row ids)."""
    eval: Sequence[Example]
    """Eval examples (an :class:`ExampleView`, empty without eval data)."""
    summary: LoadSummary
    examples: ExampleType
    """Their example type."""
    pad_id: int = 0
    """Padding id to collate with (the tokenizer's pad id, else its EOS id)."""
    weights: Optional[np.ndarray] = None
    """float64 weight of each training example (``train`` order; all > 0), or None without per-row
    weights (``data.weight_key`` / ``weights_file``; ``data/weights.py``)."""

    def collate(self, examples: Sequence[Example]) -> dict:
        """Padded micro-batch of ``examples`` with :attr:`pad_id`."""
        return self.examples.collate(examples, self.pad_id)

    def weigh(self, collate: Callable[[list], dict]) -> Callable[[list], dict]:
        """The training stream's ``collate``: batches also carry ``weights`` when the data has them."""
        if self.weights is None:
            return collate
        return RowWeights(np.asarray(self.train.row_ids), self.weights).attach(collate)


def _hold_out(n: int, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train row ids, eval row ids), ascending: a seeded random ``eval_fraction`` of rows ``0..n-1``."""
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise ValueError(f"data.eval_fraction must be in [0, 1), got {cfg.eval_fraction}")
    n_eval = round(cfg.eval_fraction * n)
    if cfg.eval_fraction > 0 and n_eval == 0:
        logger.warning("data '%s': eval_fraction=%s of %d rows holds out no row", cfg.path, cfg.eval_fraction, n)
    if n_eval == 0:
        return np.arange(n, dtype=np.int64), np.zeros(0, np.int64)
    if n_eval >= n:
        raise DataError(f"data '{cfg.path}': eval_fraction={cfg.eval_fraction} of {n} rows leaves none to train on")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).numpy()
    held = perm[:n_eval]
    if cfg.max_eval_samples is not None:
        held = held[: cfg.max_eval_samples]  # a random subset, since ``perm`` is random
    return np.sort(perm[n_eval:]), np.sort(held)


def _store(cfg: DataConfig, etype: ExampleType, split: Split, cap: Optional[int], fmt: str,
           policy: TokenPolicy, who: str, weight_key: Optional[str] = None) -> tuple[TokenStore, bool]:
    """The token store of ``split``'s first ``cap`` rows in format ``fmt`` (``auto``: from its first row),
    with each example's ``weight_key`` weight when it is set."""
    example_cls, encode, format_row = etype.example, etype.encode, etype.format_row
    cache_dir = resolve_cache_dir(cfg.cache_dir)
    fields = {
        "kind": etype.name, "example": type_name(example_cls), "schema": [vars(c) for c in schema_of(example_cls)],
        "encode": f"{encode.__module__}.{encode.__qualname__}",
        "format_row": f"{format_row.__module__}.{format_row.__qualname__}",
        "source": source_fingerprint(split, cache_dir / "files"),
        "split": split.split, "max_samples": cap, "config": {k: getattr(cfg, k) for k in FORMAT_KEYS} | {"format": fmt},
        "tokenizer": tokenizer_fingerprint(policy.tokenizer),
    }
    if weight_key:  # only then: a store without weights keeps its key
        fields["weight_key"] = weight_key

    infos = []

    def build(folder):
        first = None
        if fmt == "auto":
            first = next(iter_rows(split), None)
            if first is None:
                raise DataError(f"data '{cfg.path}': split '{split.split}' has no rows")
        resolved = resolve_format(dataclasses.replace(cfg, format=fmt), first, etype, who=who)
        tokenizer = policy.tokenizer
        vocab = max(len(tokenizer), 1 + max(tokenizer.get_vocab().values(), default=0))
        spec = BuildSpec(cfg, resolved, policy, example_cls, encode, cfg.max_len, token_dtype(vocab), format_row,
                         weight_key)
        infos.append(build_store(split, spec, folder, cap, cfg.num_proc or default_num_proc(),
                                 meta={"key": fields, "format": resolved,
                                       "first_keys": sorted(first.data) if first is not None else None}))

    store, built = load_or_build(cache_dir, store_key(fields), example_cls, build)
    if built:
        info = infos[0]
        logger.info("data '%s' [%s]: tokenized %d rows in %.1f s with %d process(es) into %s", cfg.path,
                    split.split, info.rows_used, info.seconds, info.num_proc, store.path)
    elif store.meta.get("first_keys") is not None:
        logger.info("data '%s': format auto-detected as '%s' (from keys %s)", cfg.path, store.meta["format"],
                    store.meta["first_keys"])
    return store, built


def _choose(store: TokenStore, roles: np.ndarray, role: int) -> tuple[ExampleView, Counter]:
    """The examples whose row has ``role`` (a view) and that role's skipped rows, by reason.

    The counter lists reasons in the order a row-by-row pass meets them (format skips first, then
    the encoder's), so that ties in the summary read as they always did.
    """
    view = ExampleView(store, np.flatnonzero(roles[store.row_ids] == role))
    mine = roles[store.arrays["skip_row_ids"]] == role
    ids, codes = store.arrays["skip_row_ids"][mine], store.arrays["skip_reason"][mine]
    first = np.full(len(store.meta["skip_reasons"]), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, codes, store.arrays["skip_stage"][mine].astype(np.int64) * (len(roles) + 1) + ids)
    counts = np.bincount(codes, minlength=len(first))
    return view, Counter({store.meta["skip_reasons"][c]: int(counts[c]) for c in np.argsort(first, kind="stable")
                          if counts[c]})


def _all_skipped(what: str, n: int, skipped: Counter, cfg: DataConfig) -> DataError:
    top = ", ".join(f"{reason} ({count})" for reason, count in skipped.most_common(3))
    return DataError(
        f"data '{cfg.path}': all {n} {what} rows were skipped; top reasons: {top}. "
        f"Check data.format and the *_key fields, or data.max_len={cfg.max_len}."
    )


TRAIN, EVAL = 1, 2


def load_objective_data(cfg: DataConfig, examples: ExampleType | str, tokenizer: Any,
                        objective: str = "") -> ObjectiveData:
    """Load, split, format and tokenize one objective's data (see the module doc).

    ``examples`` is the example type (``data.examples``: ``"sft"`` → :class:`SFTExample`, ``"pref"``
    → :class:`PrefExample`, or a kind's own); ``objective`` names the objective in messages.
    Raises :class:`DataError` for bad data or when every training (or eval) row is skipped.
    """
    etype = example_type(examples)
    kind = objective or etype.name
    who = f"objective '{objective}'" if objective else f"{etype.name} examples"
    if not cfg.path:
        raise DataError("data.path is empty: set it to a file, a folder or a Hugging Face dataset name")
    if cfg.max_samples is not None and cfg.max_samples < 1:
        raise ValueError(f"data.max_samples must be >= 1 or unset, got {cfg.max_samples}")
    if cfg.num_proc is not None and cfg.num_proc < 1:
        raise ValueError(f"data.num_proc must be >= 1 or unset, got {cfg.num_proc}")
    policy = TokenPolicy.of(tokenizer)
    summary = LoadSummary(path=cfg.path, split=cfg.split, kind=kind, max_len=cfg.max_len)

    store, built = _store(cfg, etype, resolve_split(cfg.path, cfg.split), cfg.max_samples, cfg.format, policy, who,
                          cfg.weight_key)
    summary.format = fmt = store.meta["format"]
    summary.rows_read, summary.rows_used = store.meta["rows_read"], store.meta["rows_used"]
    n = summary.rows_used
    if n == 0:
        raise DataError(f"data '{cfg.path}': split '{cfg.split}' has no rows")
    roles = np.zeros(n, dtype=np.int8)
    eval_store = None
    if cfg.eval_split:
        if cfg.eval_fraction:
            logger.warning("data '%s': eval_split is set, so eval_fraction=%s is ignored", cfg.path, cfg.eval_fraction)
        roles[:] = TRAIN
        eval_store, eval_built = _store(cfg, etype, resolve_split(cfg.path, cfg.eval_split), cfg.max_eval_samples,
                                        fmt, policy, who)
        built = built or eval_built
        summary.eval_from = f"split '{cfg.eval_split}'"
        summary.eval_rows = eval_store.meta["rows_used"]
    else:
        train_rows, eval_rows = _hold_out(n, cfg)
        roles[train_rows], roles[eval_rows] = TRAIN, EVAL
        if len(eval_rows):
            summary.eval_from = f"held out {cfg.eval_fraction:g} of the rows"
        summary.eval_rows = len(eval_rows)

    train, summary.skipped = _choose(store, roles, TRAIN)
    stored = store.aux[WEIGHT_COLUMN][train.index] if cfg.weight_key else None
    weights = training_weights(cfg, stored, train.row_ids)
    if weights is not None:
        summary.weighted = " and ".join(x for x in (cfg.weight_key and f"column '{cfg.weight_key}'",
                                                    cfg.weights_file and f"file '{cfg.weights_file}'") if x)
        keep = weights > 0
        summary.zero_weight = int((~keep).sum())
        if summary.zero_weight:  # weight 0 is the row absent: never drawn, no compute spent on it
            train, weights = train[np.flatnonzero(keep)], weights[keep]
    if eval_store is not None:
        evals, summary.eval_skipped = _choose(eval_store, np.full(summary.eval_rows, EVAL, np.int8), EVAL)
    else:
        evals, summary.eval_skipped = _choose(store, roles, EVAL)
    summary.truncated = int(store.aux["truncated"][train.index].sum())
    summary.train_kept, summary.eval_kept = len(train), len(evals)
    summary.cache, summary.store = ("built" if built else "cached"), str(store.path)
    if not len(train) and summary.zero_weight:
        raise DataError(f"data '{cfg.path}': every training row has weight 0 ({summary.weighted})")
    if not len(train):
        raise _all_skipped("training", int((roles == TRAIN).sum()), summary.skipped, cfg)
    if summary.eval_rows and not len(evals):
        raise _all_skipped("eval", summary.eval_rows, summary.eval_skipped, cfg)
    logger.info("%s", summary)
    return ObjectiveData(train=train, eval=evals, summary=summary, examples=etype, pad_id=policy.pad_id,
                         weights=weights)

"""Building a token store from a split: chunks of raw rows -> text parts -> examples -> columns.

The main process cuts the split into chunks (``sources.iter_chunks``: byte ranges of JSON
lines, Arrow record batches) and ``num_proc`` forked workers each parse, format and tokenize
whole chunks; the main process writes the results in row order (``store.StoreWriter``). At most
``2 * num_proc`` chunks are in flight, so a source is never held whole in memory, and reading
stops once ``max_samples`` rows are in.

Every row of the split up to ``max_samples`` ends up either as an example (with its row id and
whether its response was truncated) or as a skip with its reason; which rows train and which are
held out is decided when the store is loaded (``data/load.py``), so one store serves every
``eval_fraction`` / ``seed``. With ``data.weight_key`` every row's weight is read and checked too,
and each example's is kept in the store's auxiliary column ``weight`` (``data/weights.py``).

Errors: a worker numbers rows within its chunk (it cannot know how many rows earlier chunks
hold). When a chunk raises :class:`DataError`, the main process parses that chunk again with
the file's true row and line numbers and raises the very error the serial reader raises.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from bipost.config import DataConfig
from bipost.data.formats import format_row
from bipost.data.sources import Chunk, DataError, Numbering, Split, chunk_rows, count_rows, iter_chunks
from bipost.data.store import StoreWriter, schema_of, to_columns
from bipost.data.tokenize import TokenPolicy
from bipost.data.weights import WEIGHT_COLUMN, row_weight

logger = logging.getLogger("bipost")

RowEncoder = Callable[[Sequence[tuple], Any, int], list]
"""``encode(items, policy, max_len) -> [(example or skip reason, truncated), ...]`` where an item
is ``(row_id, *text parts)`` (e.g. ``tokenize.encode_sft_rows``). A row may also give several
examples, all with its row id: ``((example, ...), (truncated, ...))``."""


@dataclass
class BuildSpec:
    """What turns one split's rows into examples (the same in every worker)."""

    cfg: DataConfig
    fmt: str
    """The resolved format (``formats.format_row``)."""
    policy: TokenPolicy
    example_type: type
    encode: RowEncoder
    max_len: int
    token_dtype: str = "int32"
    """The store's dtype of token ids (``store.token_dtype``)."""
    format_row: Callable = format_row
    """``(row, fmt, cfg, tokenizer) -> text parts | skip reason`` (the example type's; ``formats.format_row``)."""
    weight_key: Optional[str] = None
    """Column of each row's loss weight (``data.weight_key``), kept as the auxiliary column ``weight``."""


@dataclass
class ChunkResult:
    """One chunk's outcome; row ids are positions in the chunk until the main process shifts them."""

    n_rows: int
    n_lines: int = 0
    columns: dict = field(default_factory=dict)
    truncated: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    skip_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    skip_reasons: list[str] = field(default_factory=list)
    skip_stage: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    """0: skipped by the format (``format_row``), 1: by the encoder (e.g. too long)."""
    weights: Optional[np.ndarray] = None
    """Each example's weight (``BuildSpec.weight_key``), float64; None without weights."""
    error: bool = False
    """A :class:`DataError` was raised in a worker; the main process re-raises it exactly."""


def process_chunk(spec: BuildSpec, chunk: Chunk, index0: int = 0, line0: int = 0,
                  limit: Optional[int] = None) -> ChunkResult:
    """Parse, format and encode ``chunk`` (its first ``limit`` rows); raises :class:`DataError`."""
    rows, n_lines = chunk_rows(chunk, index0, line0)
    if limit is not None:
        rows = rows[:limit]
    items: list[tuple] = []
    item_weights: list[float] = []
    skip_ids: list[int] = []
    reasons: list[str] = []
    tokenizer = spec.policy.tokenizer
    for row in rows:
        # Every row's weight is checked, a skipped one's too: a bad weight is bad data either way.
        weight = row_weight(row, spec.weight_key) if spec.weight_key else 1.0
        text = spec.format_row(row, spec.fmt, spec.cfg, tokenizer)
        if isinstance(text, str):
            skip_ids.append(row.row_id)
            reasons.append(text)
        else:
            items.append((row.row_id, *vars(text).values()))
            item_weights.append(weight)
    n_format = len(skip_ids)
    examples, cuts, weights = [], [], []
    encoded = spec.encode(items, spec.policy, spec.max_len) if items else []
    for item, weight, (result, cut) in zip(items, item_weights, encoded):
        if isinstance(result, str):
            skip_ids.append(item[0])
            reasons.append(result)
        elif isinstance(result, tuple):  # several examples of one row (e.g. a pair split in two), same row id
            examples += result
            cuts += cut if isinstance(cut, tuple) else [cut] * len(result)
        else:
            examples.append(result)
            cuts.append(cut)
            weights.append(weight)
    order = np.argsort(np.asarray(skip_ids, dtype=np.int64), kind="stable")
    return ChunkResult(
        n_rows=len(rows), n_lines=n_lines,
        columns=to_columns(schema_of(spec.example_type), examples, spec.token_dtype),
        truncated=np.asarray(cuts, dtype=bool),
        skip_ids=np.asarray(skip_ids, dtype=np.int64)[order], skip_reasons=[reasons[i] for i in order],
        skip_stage=(np.arange(len(skip_ids)) >= n_format).astype(np.int8)[order],
        weights=np.asarray(weights, dtype=np.float64) if spec.weight_key else None,
    )


_SPEC: Optional[BuildSpec] = None  # the workers' spec, inherited through fork


def _work(chunk: Chunk) -> ChunkResult:
    assert _SPEC is not None
    try:
        return process_chunk(_SPEC, chunk)
    except DataError:
        return ChunkResult(n_rows=0, error=True)


def default_num_proc() -> int:
    """Worker processes by default: the cores this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


@dataclass
class BuildInfo:
    """What a build read, for the store's meta and the load summary."""

    rows_read: int
    rows_used: int
    seconds: float
    num_proc: int


class _Pool:
    """Ordered results of ``_work`` over chunks, at most ``2 * num_proc`` in flight. The workers are
    forked when a second chunk comes (a one-chunk source is processed in this process)."""

    def __init__(self, spec: BuildSpec, num_proc: int):
        self.spec = spec
        self.num_proc = num_proc if "fork" in multiprocessing.get_all_start_methods() else 1
        self.pool: Any = None
        self.pending: deque = deque()

    def _start(self) -> None:
        global _SPEC
        _SPEC = self.spec
        # Each worker tokenizes single-threaded: num_proc processes already use the cores, and
        # the tokenizers library would otherwise warn about (and disable) its threads after fork.
        saved = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            self.pool = multiprocessing.get_context("fork").Pool(self.num_proc)
        finally:
            if saved is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved

    def submit(self, chunk: Chunk) -> None:
        if self.pool is None and self.num_proc > 1 and self.pending:
            self._start()
        fut = None if self.pool is None else self.pool.apply_async(_work, (chunk,))
        self.pending.append((chunk, fut))

    @property
    def full(self) -> bool:
        if self.num_proc == 1:
            return len(self.pending) >= 1
        return len(self.pending) >= 2 * self.num_proc

    def next(self) -> tuple[Chunk, ChunkResult]:
        chunk, fut = self.pending.popleft()
        if fut is not None:
            return chunk, fut.get()
        try:
            return chunk, process_chunk(self.spec, chunk)
        except DataError:
            return chunk, ChunkResult(n_rows=0, error=True)

    @property
    def processes(self) -> int:
        return self.num_proc if self.pool is not None else 1

    def close(self) -> None:
        global _SPEC
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
        _SPEC = None


def build_store(split: Split, spec: BuildSpec, folder: Path, max_samples: Optional[int], num_proc: int,
                meta: dict) -> BuildInfo:
    """Write the store of ``split``'s first ``max_samples`` rows into the new folder ``folder``."""
    t0 = time.perf_counter()
    writer = StoreWriter(folder, spec.example_type, spec.token_dtype)
    numbering = Numbering()
    rows_done = 0
    skip_ids: list[np.ndarray] = []
    skip_stage: list[np.ndarray] = []
    skip_reasons: list[str] = []
    chunks = iter_chunks(split)
    pool = _Pool(spec, num_proc)
    try:
        exhausted = False
        while True:
            while not exhausted and not pool.full:
                chunk = next(chunks, None)
                if chunk is None:
                    exhausted = True
                else:
                    pool.submit(chunk)
            if not pool.pending:
                break
            chunk, res = pool.next()
            limit = None if max_samples is None else max_samples - rows_done
            if res.error:  # the exact error, with the file's row and line numbers (or none past the cap)
                res = process_chunk(spec, chunk, *numbering.offsets(chunk), limit=limit)
            n_rows = res.n_rows if limit is None else min(res.n_rows, limit)
            keep = res.columns["row_id"][0] < n_rows
            columns = {k: _take(v, keep) for k, v in res.columns.items()}
            columns["row_id"] = (columns["row_id"][0] + rows_done,)
            aux = {"truncated": res.truncated[keep]}
            if res.weights is not None:
                aux[WEIGHT_COLUMN] = res.weights[keep]
            try:
                writer.append(columns, aux=aux)
            except ValueError as e:  # e.g. a ragged field whose trailing shape changes between chunks
                first = int(columns["row_id"][0][0]) if len(columns["row_id"][0]) else rows_done
                raise DataError(f"data '{split.path}' [{split.split}], rows from {first} ({chunk.source}): {e}") from e
            skip_keep = res.skip_ids < n_rows
            skip_ids.append(res.skip_ids[skip_keep] + rows_done)
            skip_stage.append(res.skip_stage[skip_keep])
            skip_reasons += [r for r, k in zip(res.skip_reasons, skip_keep) if k]
            numbering.advance(chunk, res.n_rows, res.n_lines)
            rows_done += n_rows
            if max_samples is not None and rows_done >= max_samples:
                break
    finally:
        pool.close()
        chunks.close()
    rows_read = rows_done
    if max_samples is not None and rows_done >= max_samples:
        rows_read = count_rows(split)  # the whole split's size, as the summary and the selector's meta report it
    reasons = sorted(set(skip_reasons))
    code = {r: i for i, r in enumerate(reasons)}
    info = BuildInfo(rows_read, rows_done, time.perf_counter() - t0, pool.processes)
    writer.close(
        meta={**meta, "rows_read": rows_read, "rows_used": rows_done, "skip_reasons": reasons,
              "build_seconds": round(info.seconds, 3), "num_proc": info.num_proc},
        arrays={"skip_row_ids": np.concatenate(skip_ids) if skip_ids else np.zeros(0, np.int64),
                "skip_reason": np.asarray([code[r] for r in skip_reasons], dtype=np.int32),
                "skip_stage": np.concatenate(skip_stage) if skip_stage else np.zeros(0, np.int8)},
    )
    return info


def _take(column: tuple, keep: np.ndarray) -> tuple:
    """Rows ``keep`` (a boolean mask, a prefix in practice) of one chunk column."""
    if keep.all():
        return column
    if len(column) == 1:
        return (column[0][keep],)
    values, lengths = column
    n = int(lengths[keep].sum())  # kept rows are a prefix: the cap cuts a chunk's tail
    return values[:n], lengths[keep]

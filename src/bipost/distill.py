"""``bipost distill-topk``: a teacher's top-k log-probs written into a copy of the data, once.

A big teacher can then run on other hardware (or once for many runs), and ``kd`` objectives with
``teacher_logprobs: data`` train from the written file without loading it
(``data/teacher_topk.py`` documents the columns).

What is written: every row of the objective's split (its first ``max_samples``), unchanged and in
order — so row ids, and selector weights keyed by them, still apply — plus ``teacher_topk_ids``
and ``teacher_topk_logps``: ``[n][k]`` lists, one per position that predicts a response token,
computed on bipost's tokenization of the row (the config's tokenizer, format, keys and ``max_len``)
by the same code as the teacher cache (``kinds/kd.py: topk_rows``, ``example_cache.compute_rows``;
several ranks split the forwards). Log-probs are the teacher's log-softmax over its vocabulary at
temperature 1 (training rescales them to its ``temperature``). A row the data layer skips (empty,
too long for ``max_len``) gets null columns, which training skips the same way.

The examples are processed in blocks (``block`` examples: their rows are held in memory, ``8 k``
bytes per response token) and written as they come: JSON lines, or Parquet (one row group per
block; the original columns keep a Parquet source's schema, other sources' is inferred from the
first block).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from bipost.config import RunConfig
from bipost.data.examples import SFT
from bipost.data.sources import DataError, Row, iter_rows, resolve_split
from bipost.data.store import ExampleView
from bipost.data.teacher_topk import BIPOST

log = logging.getLogger("bipost")


@dataclass
class DistillResult:
    out: Path
    rows: int
    """Rows written."""
    with_topk: int
    """Rows with top-k columns (the others were skipped by the data layer: null columns)."""
    k: int
    tokens: int
    """Response positions distilled."""

    def __str__(self) -> str:
        return (f"wrote {self.rows} rows to {self.out}: {self.with_topk} with the teacher's top-{self.k} at "
                f"{self.tokens} response positions, {self.rows - self.with_topk} skipped (null columns)")


def _objective(cfg: RunConfig, name: Optional[str]):
    from bipost.configio import ConfigError

    kds = [o for o in cfg.objectives if o.kind == "kd"]
    if name is not None:
        found = [o for o in cfg.objectives if o.name == name]
        if not found:
            raise ConfigError(f"--objective {name!r} is not an objective name ({[o.name for o in cfg.objectives]})")
        if found[0].kind != "kd":
            raise ConfigError(f"--objective {name!r} is a {found[0].kind} objective; distill-topk needs a kd one")
        return found[0]
    if len(kds) != 1:
        raise ConfigError(f"the config has {len(kds)} kd objectives: name one with --objective")
    return kds[0]


def distill_topk(cfg: RunConfig, out: str | os.PathLike, *, objective: Optional[str] = None,
                 k: Optional[int] = None, split: Optional[str] = None, block: int = 4096,
                 batch_size: Optional[int] = None) -> DistillResult:
    """Write ``out`` (``.jsonl`` or ``.parquet``): the kd objective's rows plus its teacher's top-``k``
    (default ``kd_topk``) columns, for ``split`` (default ``data.split``). See the module docstring."""
    from bipost.configio import ConfigError
    from bipost.data import load_objective_data
    from bipost.engine import Engine
    from bipost.example_cache import compute_rows
    from bipost.kinds.kd import topk_rows
    from bipost.modeling.attention import use_packed_attention
    from bipost.modeling.forward import Forward, ForwardOptions
    from bipost.models import load_causal_lm, load_tokenizer

    ocfg = _objective(cfg, objective)
    out = Path(out)
    if out.suffix.lower() not in (".jsonl", ".parquet"):
        raise ConfigError(f"--out {out}: write a .jsonl or a .parquet file")
    k = k or ocfg.kd_topk
    if not k or k < 1:
        raise ConfigError(f"how many tokens per position? give --k or objectives.N.kd_topk (objective {ocfg.name})")
    if not ocfg.teacher:
        raise ConfigError(f"objective {ocfg.name} has no teacher (objectives.N.teacher) to distil from")
    if block < 1:
        raise ConfigError("--block must be >= 1")
    dcfg = dataclasses.replace(ocfg.data, split=split or ocfg.data.split, eval_split=None, eval_fraction=0.0,
                               max_eval_samples=None, weight_key=None, weights_file=None, missing_weight=None)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, cfg.model.trust_remote_code)
    data = load_objective_data(dcfg, SFT, tokenizer, objective=ocfg.name or "kd")
    examples: ExampleView = data.train  # type: ignore[assignment]
    rows_used = data.summary.rows_used

    engine = Engine.for_run(cfg)
    teacher = engine.place(load_causal_lm(ocfg.teacher, cfg.model, frozen=True))
    if cfg.train.packing:
        use_packed_attention(teacher)
    head = engine.head_rows(teacher)
    if k > head:
        raise ConfigError(f"--k {k} exceeds the teacher's vocabulary of {head} tokens")
    forward = Forward(ForwardOptions(cfg.train.logits, cfg.train.logits_chunk_size), engine)
    fn = topk_rows(forward, dataclasses.replace(ocfg, kd_topk=k, temperature=1.0))
    collate = SFT.collate_fn(tokenizer.pad_token_id, cfg.train.packing)
    batch = batch_size or cfg.train.eval_batch_size or ocfg.micro_batch_size or 1

    split_obj = resolve_split(dcfg.path, dcfg.split)
    writer = _Writer(out, split_obj) if engine.is_main else None
    raw = _capped(iter_rows(split_obj), rows_used) if writer is not None else iter(())
    ids_all = examples.row_ids
    with_topk = tokens = 0
    try:
        for a in range(0, len(examples), block):
            b = min(a + block, len(examples))
            with engine.stage(f"distill-topk rows {a}-{b}"):
                offsets, tensors = compute_rows(examples[a:b], teacher, fn, collate, batch, engine)
            if writer is None:
                continue
            cols = _columns(ids_all[a:b], offsets.numpy(), tensors["ids"].numpy(), tensors["logps"].numpy())
            writer.write(_merge(raw, cols, until=int(ids_all[b - 1])))
            with_topk += len(cols)
            tokens += int(offsets[-1])
        if writer is not None:
            writer.write(_merge(raw, {}, until=rows_used - 1))
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    engine.barrier()
    result = DistillResult(out, rows_used, with_topk, k, tokens)
    log.info("%s", result)
    return result


def _capped(rows: Iterator[Row], n: int) -> Iterator[Row]:
    for row in rows:
        if row.row_id >= n:
            return
        yield row


def _columns(row_ids: np.ndarray, offsets: np.ndarray, ids: np.ndarray, logps: np.ndarray) -> dict[int, tuple]:
    """Row id -> (ids, logps) as nested lists."""
    return {int(r): (ids[offsets[i]:offsets[i + 1]].tolist(), logps[offsets[i]:offsets[i + 1]].tolist())
            for i, r in enumerate(row_ids)}


def _merge(raw: Iterator[Row], cols: dict[int, tuple], until: int) -> list[dict]:
    """The raw rows up to row id ``until`` with their columns (null where the row has no example)."""
    out = []
    if until < 0:
        return out
    for row in raw:
        ids, logps = cols.get(row.row_id, (None, None))
        out.append({**row.data, BIPOST[0]: ids, BIPOST[1]: logps})
        if row.row_id >= until:
            break
    return out


class _Writer:
    """JSON lines or Parquet, block by block, into a temporary file renamed over ``out`` at the end."""

    def __init__(self, out: Path, split):
        self.out = out
        self.tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
        out.parent.mkdir(parents=True, exist_ok=True)
        self.parquet = out.suffix.lower() == ".parquet"
        self.schema: Any = None
        self.pq: Any = None
        self.file: Any = None
        if self.parquet and split.files and all(f.suffix.lower() == ".parquet" for f in split.files):
            import pyarrow.parquet as pq

            self.schema = _with_topk(pq.read_schema(split.files[0]))
        elif not self.parquet:
            self.file = open(self.tmp, "w", encoding="utf-8")

    def write(self, rows: list[dict]) -> None:
        if not rows:
            return
        if not self.parquet:
            self.file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.schema is None:
            plain = pa.Table.from_pylist([{k: v for k, v in r.items() if k not in BIPOST} for r in rows]).schema
            self.schema = _with_topk(plain)
        try:
            table = pa.Table.from_pylist(rows, schema=self.schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as e:
            raise DataError(f"{self.out}: a later block's columns do not fit the Parquet schema of the first "
                            f"({e}); write .jsonl instead") from e
        if self.pq is None:
            self.pq = pq.ParquetWriter(self.tmp, self.schema)
        self.pq.write_table(table)

    def close(self) -> None:
        if self.parquet:
            if self.pq is None:  # no row at all: an empty table of the schema
                import pyarrow as pa
                import pyarrow.parquet as pq

                pq.write_table(pa.Table.from_pylist([], schema=self.schema or _with_topk(pa.schema([]))), self.tmp)
            else:
                self.pq.close()
        else:
            self.file.close()
        os.replace(self.tmp, self.out)

    def abort(self) -> None:
        for handle in (self.pq, self.file):
            try:
                if handle is not None:
                    handle.close()
            except Exception:  # noqa: BLE001 - cleaning up after the real error
                pass
        self.tmp.unlink(missing_ok=True)


def _with_topk(schema):
    """``schema`` with the two top-k columns typed (list of lists of int32 / float32) at the end."""
    import pyarrow as pa

    fields = [f for f in schema if f.name not in BIPOST]
    fields += [pa.field(BIPOST[0], pa.list_(pa.list_(pa.int32()))),
               pa.field(BIPOST[1], pa.list_(pa.list_(pa.float32())))]
    return pa.schema(fields)

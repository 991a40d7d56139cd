"""Keep the highest-weighted rows of the original dataset, unchanged, in their original order.

The selector's weights are keyed by ``row_id``, the row's position in the original split (all of
its files concatenated in sorted order, before ``max_samples``, skipping or the eval hold-out; see
``bipost.data.sources``). ``filter_rows`` reads the split the same way and writes the kept rows:

* JSON lines (``.jsonl``, and ``.json`` files holding JSON lines): the original *lines*, byte for
  byte (line endings included);
* CSV: the header and the original record lines, byte for byte;
* Parquet: the same table restricted to the kept rows (``Table.take``: same schema and values);
* a ``.json`` array or object of columns: a JSON array of the kept rows' objects (same content,
  new layout);
* a Hugging Face hub dataset: JSON lines of the kept rows (``out`` must end with ``.jsonl``).

A folder is filtered file by file into a folder with the same relative paths. Rows the selector
never weighted (held out for evaluation, skipped as unusable, or beyond ``max_samples``) are
dropped unless ``keep_unweighted``.

Everything streams: the weights are numpy columns, the kept rows a boolean mask over row ids, and
each file is read and written chunk by chunk (JSON lines and CSV records as byte ranges, Parquet
as record batches), so filtering a million rows never holds them all.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from bipost.data.sources import DataError, Numbering, Split, chunk_rows, count_rows, iter_chunks, resolve_split
from bipost.selector.outputs import read_weights


@dataclass
class FilterResult:
    out: Path
    """The filtered file (or folder)."""
    kept: int
    """Rows written."""
    weighted: int
    """Rows that had a weight."""
    unweighted: int
    """Rows of the split without a weight."""
    keep_unweighted: bool = False
    """Whether those were written too."""
    files: list[Path] = field(default_factory=list)

    def __str__(self) -> str:
        text = f"kept {self.kept} rows ({self.kept - self.unweighted * self.keep_unweighted} of {self.weighted} weighted"
        if self.unweighted:
            text += f"; {self.unweighted} rows without a weight {'kept' if self.keep_unweighted else 'dropped'}"
        return text + f") -> {self.out}"


def _pairs(weights) -> tuple[np.ndarray, np.ndarray]:
    """(row ids int64, weights float64) of a ``{row_id: weight}`` mapping or of weights-file columns."""
    if isinstance(weights, dict) and "row_id" in weights and "weight" in weights:
        return np.asarray(weights["row_id"], dtype=np.int64), np.asarray(weights["weight"], dtype=np.float64)
    return (np.fromiter((int(k) for k in weights), dtype=np.int64, count=len(weights)),
            np.fromiter((float(v) for v in weights.values()), dtype=np.float64, count=len(weights)))


def select_ids(weights: Mapping[int, float] | dict, *, top_p: float | None = None, top_k: int | None = None,
               min_weight: float | None = None) -> np.ndarray:
    """:func:`select_row_ids` as a sorted int64 array (no Python object per row)."""
    if sum(x is not None for x in (top_p, top_k, min_weight)) != 1:
        raise ValueError("give exactly one of top_p, top_k, min_weight")
    ids, w = _pairs(weights)
    if min_weight is not None:
        return np.sort(ids[w >= min_weight])
    order = np.lexsort((ids, -w))  # highest weight first; ties: the lower row id
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        top_k = max(1, round(top_p * len(order)))
    assert top_k is not None
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    return np.sort(ids[order[:top_k]])


def select_row_ids(weights: Mapping[int, float] | dict[str, list], *, top_p: float | None = None,
                   top_k: int | None = None, min_weight: float | None = None) -> set[int]:
    """Row ids to keep: the ``top_k`` highest weights, the highest ``round(top_p * N)`` (at least one),
    or every row with ``weight >= min_weight`` — exactly one criterion. Ties are broken by the lower
    row id (the weights file's ``rank``)."""
    return set(select_ids(weights, top_p=top_p, top_k=top_k, min_weight=min_weight).tolist())


# ---------------------------------------------------------------------------------- writers

def _atomic(dst: Path, write) -> None:
    tmp = dst.with_name(f".tmp-{dst.name}")
    try:
        write(tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _write_lines(split: Split, file_no: int, row0: int, keep: np.ndarray, f) -> int:
    """The kept rows' original lines of a JSON-lines file, chunk by chunk; returns its row count.
    ``Row.line`` numbers ``str.splitlines`` of the chunk's text, as here (\\r\\n and \\r each end a line)."""
    numbering, n = Numbering(), 0
    for chunk in iter_chunks(Split(split.path, split.split, [split.files[file_no]])):
        index0, line0 = numbering.offsets(chunk)
        rows, n_lines = chunk_rows(chunk, index0, line0)
        file, offset, length = chunk.payload
        with open(file, "rb") as src:
            src.seek(offset)
            lines = src.read(length).decode("utf-8").splitlines(keepends=True)
        f.write("".join(lines[r.line - line0 - 1] for r in rows if keep[row0 + r.index]).encode("utf-8"))
        numbering.advance(chunk, len(rows), n_lines)
        n += len(rows)
    return n


def _write_csv(file: Path, row0: int, keep: np.ndarray, f) -> int:
    """Header + the kept records' original lines (a quoted field may span lines), streamed."""
    with open(file, encoding="utf-8", newline="") as src:
        pending: list[str] = []
        reader = csv.reader(_tee(src, pending))
        next(reader, None)
        f.write("".join(pending).encode("utf-8"))
        pending.clear()
        n = 0
        for record in reader:
            if record:  # blank lines are no records (pyarrow skips them too)
                if keep[row0 + n]:
                    f.write("".join(pending).encode("utf-8"))
                n += 1
            pending.clear()
    return n


def _tee(lines, seen: list[str]):
    """Yield ``lines``, remembering in ``seen`` those consumed since the caller last cleared it."""
    for line in lines:
        seen.append(line)
        yield line


def _write_parquet(file: Path, row0: int, keep: np.ndarray, dst: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(file)
    n = 0
    with pq.ParquetWriter(dst, pf.schema_arrow) as writer:
        for batch in pf.iter_batches(batch_size=65536):
            mask = pa.array(keep[row0 + n: row0 + n + batch.num_rows])
            writer.write_batch(batch.filter(mask))
            n += batch.num_rows
    return n


def _write_file(split: Split, file_no: int, row0: int, keep: np.ndarray, dst: Path) -> int:
    """Write ``split.files[file_no]``'s kept rows to ``dst``; returns how many rows the file has."""
    file = split.files[file_no]
    suffix = file.suffix.lower()
    n = 0

    def write(tmp: Path) -> None:
        nonlocal n
        if suffix == ".jsonl":
            with open(tmp, "wb") as f:
                n = _write_lines(split, file_no, row0, keep, f)
        elif suffix == ".csv":
            with open(tmp, "wb") as f:
                n = _write_csv(file, row0, keep, f)
            rows = count_rows(Split(split.path, split.split, [file]))
            if rows != n:
                raise DataError(f"file '{file}': found {n} CSV records but the loader read {rows} rows; "
                                f"can't copy the kept records byte for byte")
        elif suffix == ".parquet":
            n = _write_parquet(file, row0, keep, tmp)
        elif suffix == ".json":
            rows = [r for c in iter_chunks(Split(split.path, split.split, [file])) for r in chunk_rows(c)[0]]
            n = len(rows)
            kept = [r for r in rows if keep[row0 + r.index]]
            if all(r.line is not None for r in rows):  # JSON lines in a .json file: the original lines
                lines = file.read_bytes().decode("utf-8").splitlines(keepends=True)
                tmp.write_bytes("".join(lines[r.line - 1] for r in kept).encode("utf-8"))  # type: ignore[operator]
            else:
                tmp.write_text(json.dumps([r.data for r in kept], ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        else:  # pragma: no cover - resolve_split accepts nothing else
            raise DataError(f"file '{file}': can't filter a {suffix} file")

    _atomic(dst, write)
    return n


# ---------------------------------------------------------------------------------- filter

def filter_rows(weights: str | Path | Mapping[int, float] | dict[str, list], dataset: str | Path | None,
                out: str | Path, *, top_p: float | None = None, top_k: int | None = None,
                min_weight: float | None = None, split: str | None = None,
                keep_unweighted: bool = False) -> FilterResult:
    """Write the kept rows of ``dataset`` (its ``split``) to ``out``; see the module docstring.

    ``weights`` is a weights file (or a folder holding one, e.g. a run directory), its columns, or a
    ``{row_id: weight}`` mapping. ``dataset`` and ``split`` default to the ones recorded in the
    weights' ``meta.json``. The weights must come from this very data: a row id past its end, or a
    different row count than the selector's run read, is an error.
    """
    meta: dict = {}
    if isinstance(weights, (str, Path)):
        weights, meta = read_weights(weights)
    ids, _ = _pairs(weights)  # type: ignore[arg-type]
    dataset = dataset or meta.get("data_path")
    split = split or meta.get("split") or "train"
    if not dataset:
        raise ValueError("no dataset given and the weights record none (pass --data)")
    src = resolve_split(dataset, split)
    n_rows = count_rows(src)
    if meta.get("rows_read") not in (None, n_rows):
        raise DataError(f"'{dataset}' [{split}] has {n_rows} rows, but the selector's run read "
                        f"{meta['rows_read']}: these weights belong to other data")
    if len(ids) and int(ids.max()) >= n_rows:
        raise DataError(f"weights name row id {int(ids.max())}, but '{dataset}' [{split}] has only {n_rows} rows: "
                        f"these weights belong to other data")
    weighted = np.zeros(n_rows, dtype=bool)
    weighted[ids] = True
    keep = np.zeros(n_rows, dtype=bool)
    keep[select_ids(weights, top_p=top_p, top_k=top_k, min_weight=min_weight)] = True  # type: ignore[arg-type]
    unweighted = int(n_rows - weighted.sum())
    if keep_unweighted:
        keep |= ~weighted

    out = Path(out)
    files: list[Path] = []
    local = Path(dataset).expanduser()
    if src.hub is None:
        root = local if local.is_dir() else local.parent
        row0 = 0
        for file_no, file in enumerate(src.files):
            if local.is_file():
                dst = out / file.name if out.is_dir() else out
                if dst.suffix.lower() != file.suffix.lower():
                    raise ValueError(f"--out {dst} must have the input's suffix {file.suffix} (rows are copied unchanged)")
            else:
                dst = out / file.relative_to(root)
            if dst.resolve() == file.resolve():
                raise ValueError(f"refusing to overwrite the input file {file}")
            dst.parent.mkdir(parents=True, exist_ok=True)
            row0 += _write_file(src, file_no, row0, keep, dst)
            files.append(dst)
    else:  # hub dataset: the rows as JSON lines
        if out.suffix != ".jsonl":
            raise ValueError(f"filtering hub dataset '{dataset}' writes JSON lines: --out must end with .jsonl")
        out.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                for chunk in iter_chunks(src):
                    f.write("".join(json.dumps(r.data, ensure_ascii=False) + "\n"
                                    for r in chunk_rows(chunk)[0] if keep[r.index]))

        _atomic(out, write)
        files.append(out)
    return FilterResult(out=out if not local.is_file() or not out.is_dir() else files[0], kept=int(keep.sum()),
                        weighted=len(ids), unweighted=unweighted, keep_unweighted=keep_unweighted, files=files)

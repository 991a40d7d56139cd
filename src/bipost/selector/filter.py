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
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from bipost.data.sources import DataError, Row, load_split
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


def select_row_ids(weights: Mapping[int, float] | dict[str, list], *, top_p: float | None = None,
                   top_k: int | None = None, min_weight: float | None = None) -> set[int]:
    """Row ids to keep: the ``top_k`` highest weights, the highest ``round(top_p * N)`` (at least one),
    or every row with ``weight >= min_weight`` — exactly one criterion. Ties are broken by the lower
    row id (the weights file's ``rank``)."""
    if sum(x is not None for x in (top_p, top_k, min_weight)) != 1:
        raise ValueError("give exactly one of top_p, top_k, min_weight")
    if isinstance(weights, dict) and "row_id" in weights and "weight" in weights:
        pairs = list(zip(weights["row_id"], weights["weight"]))
    else:
        pairs = list(weights.items())  # type: ignore[union-attr]
    if min_weight is not None:
        return {int(r) for r, w in pairs if w >= min_weight}
    order = sorted(pairs, key=lambda rw: (-rw[1], rw[0]))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        top_k = max(1, round(top_p * len(order)))
    assert top_k is not None
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    return {int(r) for r, _ in order[:top_k]}


# ---------------------------------------------------------------------------------- writers

def _decode(file: Path) -> str:
    # bytes -> str without newline translation, so that the lines re-encode to the same bytes
    return file.read_bytes().decode("utf-8")


def _write_lines(file: Path, rows: list[Row], dst: Path) -> None:
    """The rows' original lines. ``Row.line`` numbers ``str.splitlines`` of the file's text, as here
    (a newline-translated read splits the same way: \\r\\n and \\r each end one line)."""
    lines = _decode(file).splitlines(keepends=True)
    dst.write_bytes("".join(lines[r.line - 1] for r in rows).encode("utf-8"))  # type: ignore[operator]


def _write_csv(file: Path, rows: list[Row], n_rows: int, dst: Path) -> None:
    """Header + the kept records' original lines (a quoted field may span lines)."""
    lines = list(io.StringIO(_decode(file), newline=""))
    reader = csv.reader(iter(lines))
    next(reader, None)
    header_end = reader.line_num
    spans, start = [], header_end
    for record in reader:
        if record:  # blank lines are no records (pyarrow skips them too)
            spans.append((start, reader.line_num))
        start = reader.line_num
    if len(spans) != n_rows:
        raise DataError(f"file '{file}': found {len(spans)} CSV records but the loader read {n_rows} rows; "
                        f"can't copy the kept records byte for byte")
    out = lines[:header_end] + [line for r in rows for line in lines[slice(*spans[r.index])]]
    dst.write_bytes("".join(out).encode("utf-8"))


def _write_parquet(file: Path, rows: list[Row], dst: Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(file).take([r.index for r in rows]), dst)


def _write_file(file: Path, all_rows: list[Row], kept: list[Row], dst: Path) -> None:
    suffix = file.suffix.lower()
    if all(r.line is not None for r in all_rows) and suffix in (".jsonl", ".json"):
        _write_lines(file, kept, dst)
    elif suffix == ".json":
        dst.write_text(json.dumps([r.data for r in kept], ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    elif suffix == ".csv":
        _write_csv(file, kept, len(all_rows), dst)
    elif suffix == ".parquet":
        _write_parquet(file, kept, dst)
    else:  # pragma: no cover - load_split accepts nothing else
        raise DataError(f"file '{file}': can't filter a {suffix} file")


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
    table: Mapping[int, float]
    if isinstance(weights, dict) and "row_id" in weights and "weight" in weights:
        table = dict(zip((int(r) for r in weights["row_id"]), weights["weight"]))
    else:
        table = {int(k): float(v) for k, v in weights.items()}  # type: ignore[union-attr]
    dataset = dataset or meta.get("data_path")
    split = split or meta.get("split") or "train"
    if not dataset:
        raise ValueError("no dataset given and the weights record none (pass --data)")
    rows = load_split(dataset, split)
    if meta.get("rows_read") not in (None, len(rows)):
        raise DataError(f"'{dataset}' [{split}] has {len(rows)} rows, but the selector's run read "
                        f"{meta['rows_read']}: these weights belong to other data")
    if table and max(table) >= len(rows):
        raise DataError(f"weights name row id {max(table)}, but '{dataset}' [{split}] has only {len(rows)} rows: "
                        f"these weights belong to other data")
    keep = select_row_ids(table, top_p=top_p, top_k=top_k, min_weight=min_weight)
    unweighted = [r.row_id for r in rows if r.row_id not in table]
    if keep_unweighted:
        keep |= set(unweighted)

    out = Path(out)
    by_file: dict[str, list[Row]] = {}
    for r in rows:
        by_file.setdefault(r.source, []).append(r)
    local = Path(dataset).expanduser()
    files: list[Path] = []
    if local.is_file() or local.is_dir():
        root = local if local.is_dir() else local.parent
        for source, file_rows in by_file.items():
            src = Path(source)
            if local.is_file():
                dst = out / src.name if out.is_dir() else out
                if dst.suffix.lower() != src.suffix.lower():
                    raise ValueError(f"--out {dst} must have the input's suffix {src.suffix} (rows are copied unchanged)")
            else:
                dst = out / src.relative_to(root)
            if dst.resolve() == src.resolve():
                raise ValueError(f"refusing to overwrite the input file {src}")
            dst.parent.mkdir(parents=True, exist_ok=True)
            _write_file(src, file_rows, [r for r in file_rows if r.row_id in keep], dst)
            files.append(dst)
    else:  # hub dataset: the rows as JSON lines
        if out.suffix != ".jsonl":
            raise ValueError(f"filtering hub dataset '{dataset}' writes JSON lines: --out must end with .jsonl")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r.data, ensure_ascii=False) + "\n" for r in rows if r.row_id in keep),
                       encoding="utf-8")
        files.append(out)
    kept = sum(r.row_id in keep for r in rows)
    return FilterResult(out=out if not local.is_file() or not out.is_dir() else files[0], kept=kept,
                        weighted=len(table), unweighted=len(unweighted), keep_unweighted=keep_unweighted,
                        files=files)

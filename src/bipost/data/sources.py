"""Reading raw rows: local files, folders of files, or Hugging Face hub datasets.

Every row keeps ``row_id``, its position in the *original* split (all files of the split
concatenated in sorted order), before any cap, skip or eval hold-out, so that per-row
decisions made later always refer to the source row.

Supported local files: ``.jsonl``, ``.json`` (JSON lines, one JSON array of objects, or
one object of equal-length column lists), ``.parquet`` and ``.csv`` (every CSV cell is read
as a string; an empty cell is the empty string). JSON is parsed with Python's ``json``
module so that a missing key stays distinguishable from a ``null`` value and a corrupted
line is reported with its file and line number.

Large sources are read in :class:`Chunk` s, never whole: ``.jsonl`` as byte ranges cut at line
ends (the rows are parsed where the chunk is processed, possibly in another process),
``.parquet`` and ``.csv`` as Arrow record batches of a streaming reader, hub datasets as slices
of their memory-mapped Arrow table. Only a ``.json`` file (an array or columns) is parsed
whole. :func:`iter_chunks` yields them in row order and :func:`chunk_rows` turns one into rows;
:func:`load_split` is the two together for callers that want every row in memory.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")

# Files named for these splits are never folded into the "train" fallback of a folder that
# has no train-named file: silently training on test data is worse than an error.
_EVAL_SPLIT_NAMES = ("test", "validation", "valid", "val", "dev", "eval")

# What a hub dataset id can look like ("name" or "owner/name"); anything else that does
# not exist locally is reported as a missing local path without asking the hub.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

CHUNK_BYTES = 1 << 20
"""Bytes of a ``.jsonl`` chunk (cut back to the last line end)."""
CHUNK_ROWS = 1024
"""Rows of a chunk of any other source."""


class DataError(ValueError):
    """Bad or unreadable data. The message names the file (or dataset), the row and the field."""


@dataclass
class Row:
    """One raw row of a split."""

    row_id: int
    """Position in the original split (all its files concatenated), before caps/skips/hold-out."""
    data: dict
    """The row's fields as read (JSON types; a missing key is absent, a null is ``None``)."""
    source: str
    """The file (or ``hf:<name>[<split>]``) the row came from."""
    index: int
    """0-based position of the row inside ``source``."""
    line: Optional[int] = None
    """1-based line number in ``source`` for JSON-lines files, else ``None``."""

    def where(self) -> str:
        """Human location for error messages: ``file 'x.jsonl', row 3 (line 5)``."""
        at = f"file '{self.source}', row {self.index}"
        if self.line is not None:
            at += f" (line {self.line})"
        return at


@dataclass
class Split:
    """What a split of ``path`` is made of: local files in row order, or a hub dataset."""

    path: str
    split: str
    files: list[Path]
    """Local files, read in this order (empty for a hub dataset)."""
    hub: Any = None
    """The ``datasets.Dataset`` of a hub split (memory-mapped Arrow)."""

    @property
    def hub_source(self) -> str:
        return f"hf:{self.path}[{self.split}]"


@dataclass
class Chunk:
    """A run of consecutive rows of one source file (or of a hub dataset), not yet parsed."""

    source: str
    """The file (or ``hf:<name>[<split>]``) the rows come from (``Row.source``)."""
    file_no: int
    """Which file of the split (0 for a hub dataset)."""
    kind: str
    """``jsonl`` (payload: path, byte offset, byte length), ``rows`` (payload: parsed rows with
    their indices) or ``arrow`` (payload: the rows as an Arrow IPC stream; ``start``: the first
    row's index). IPC, because pickling an Arrow slice would copy its whole parent buffers."""
    payload: Any
    start: int = 0
    """Index in ``source`` of the chunk's first row, where known before parsing (not ``jsonl``)."""


def resolve_split(path: str | os.PathLike, split: str = "train") -> Split:
    """The files (or hub dataset) of ``split`` of ``path``; see :func:`load_split` for the rules.

    Raises :class:`DataError` for an unknown split (listing the available ones) or a path that is
    neither local nor a reachable hub dataset.
    """
    path_str = os.fspath(path)
    local = Path(path_str).expanduser()
    if local.is_file():
        if split != "train":
            raise DataError(
                f"'{path_str}' is a single file, which only has the 'train' split; "
                f"split '{split}' does not exist (available: ['train'])"
            )
        _check_suffix(local)
        return Split(path_str, split, [local])
    if local.is_dir():
        return Split(path_str, split, _folder_files(local, split))
    return Split(path_str, split, [], hub=_load_hub(path_str, split))


def load_split(path: str | os.PathLike, split: str = "train") -> list[Row]:
    """Read every row of ``split`` from ``path``.

    ``path`` is a supported file (the only split it has is ``train``), a folder (the files
    whose name starts with ``split``, searched recursively and read in sorted order; when
    there is none and ``split == "train"``, all supported files except those named for an
    evaluation split), or else a Hugging Face dataset name loaded with
    ``datasets.load_dataset(path, split=split)``.

    Raises :class:`DataError` for unreadable files, an unknown split (listing the available
    ones), or a path that is neither local nor a reachable hub dataset.
    """
    return list(iter_rows(resolve_split(path, split)))


def iter_rows(split: Split) -> Iterator[Row]:
    """Every row of ``split``, numbered, read chunk by chunk (only one chunk's rows at a time)."""
    row_id = 0
    numbering = Numbering()
    for chunk in iter_chunks(split):
        rows, n_lines = chunk_rows(chunk, *numbering.offsets(chunk))
        for r in rows:
            r.row_id = row_id
            row_id += 1
        numbering.advance(chunk, len(rows), n_lines)
        yield from rows


class Numbering:
    """Row indices and line numbers inside each file, accumulated over the chunks read in order."""

    def __init__(self) -> None:
        self.file_no = -1
        self.index = 0
        self.line = 0

    def offsets(self, chunk: Chunk) -> tuple[int, int]:
        """``(index, line)`` offsets of ``chunk``'s first row within its file."""
        if chunk.file_no != self.file_no:
            return 0, 0
        return self.index, self.line

    def advance(self, chunk: Chunk, n_rows: int, n_lines: int) -> None:
        self.index, self.line = self.offsets(chunk)
        self.file_no = chunk.file_no
        self.index += n_rows
        self.line += n_lines


def _check_suffix(file: Path) -> None:
    if file.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise DataError(f"file '{file}': unsupported type '{file.suffix.lower()}' (supported: {', '.join(SUPPORTED_SUFFIXES)})")


def _split_name(file: Path) -> str:
    """The split a file is named for: its name up to the first '-', '_' or '.'."""
    return re.split(r"[-_.]", file.name, maxsplit=1)[0]


def _folder_files(folder: Path, split: str) -> list[Path]:
    files = sorted(
        (f for f in folder.rglob("*")
         if f.is_file() and f.suffix.lower() in SUPPORTED_SUFFIXES
         and not any(part.startswith(".") for part in f.relative_to(folder).parts)),
        key=lambda f: f.relative_to(folder).as_posix(),
    )
    if not files:
        raise DataError(
            f"folder '{folder}' holds no data file of a supported type ({', '.join(SUPPORTED_SUFFIXES)})"
        )
    chosen = [f for f in files if f.name.startswith(split)]
    if not chosen and split == "train":
        chosen = [f for f in files if _split_name(f).lower() not in _EVAL_SPLIT_NAMES]
    if not chosen:
        available = sorted({_split_name(f) for f in files})
        if any(_split_name(f).lower() not in _EVAL_SPLIT_NAMES for f in files):
            available = sorted(set(available) | {"train"})
        raise DataError(
            f"split '{split}' not found in folder '{folder}': no file name starts with '{split}' "
            f"(available splits: {available})"
        )
    return chosen


# ------------------------------------------------------------------------------ chunks
def iter_chunks(split: Split, chunk_bytes: int = 0, chunk_rows: int = 0) -> Iterator[Chunk]:
    """The chunks of ``split`` in row order (sizes: :data:`CHUNK_BYTES`, :data:`CHUNK_ROWS`).

    Unreadable parquet/CSV files raise :class:`DataError` here; bad JSON lines when the chunk is
    parsed (:func:`chunk_rows`).
    """
    chunk_bytes, chunk_rows = chunk_bytes or CHUNK_BYTES, chunk_rows or CHUNK_ROWS
    if split.hub is not None:
        table = split.hub.with_format("arrow")
        for a in range(0, len(split.hub), chunk_rows):
            yield Chunk(split.hub_source, 0, "arrow", _ipc(table[a:a + chunk_rows]), start=a)
        return
    for file_no, file in enumerate(split.files):
        suffix = file.suffix.lower()
        if suffix == ".jsonl":
            for offset, length in _line_blocks(file, chunk_bytes):
                yield Chunk(str(file), file_no, "jsonl", (file, offset, length))
        elif suffix == ".json":
            rows = _read_json(file)
            for a in range(0, len(rows), chunk_rows):
                yield Chunk(str(file), file_no, "rows", rows[a:a + chunk_rows], start=a)
        elif suffix == ".parquet":
            yield from _arrow_chunks(file, file_no, _parquet_batches(file, chunk_rows), chunk_rows)
        elif suffix == ".csv":
            yield from _arrow_chunks(file, file_no, _csv_batches(file), chunk_rows)
        else:
            _check_suffix(file)


def _arrow_chunks(file: Path, file_no: int, batches: Iterator[Any], chunk_rows: int) -> Iterator[Chunk]:
    start = 0
    for batch in batches:
        for a in range(0, batch.num_rows, chunk_rows):
            part = batch.slice(a, chunk_rows)
            yield Chunk(str(file), file_no, "arrow", _ipc(part), start=start)
            start += part.num_rows


def _ipc(data: Any) -> Any:
    """An Arrow table or record batch as an IPC stream buffer holding only its own rows."""
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, data.schema) as writer:
        writer.write(data)
    return sink.getvalue()


def _line_blocks(file: Path, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` byte ranges of ``file`` of about ``chunk_bytes``, each ending at a ``\\n``.

    A ``\\n`` byte ends a line in every reading (UTF-8 never uses it inside a character, and
    ``str.splitlines`` ends a line there), so the lines of the ranges are the lines of the file.
    """
    size = file.stat().st_size
    offset = 0
    with open(file, "rb") as f:
        while offset < size:
            f.seek(offset + chunk_bytes)
            tail = f.read(1 << 16) if offset + chunk_bytes < size else b""
            cut = tail.find(b"\n")
            while cut < 0 and tail:  # a very long line: read on to its end
                more = f.read(1 << 20)
                if not more:
                    break
                tail += more
                cut = tail.find(b"\n")
            end = size if cut < 0 else min(size, offset + chunk_bytes + cut + 1)
            yield offset, end - offset
            offset = end


def chunk_rows(chunk: Chunk, index0: int = 0, line0: int = 0) -> tuple[list[Row], int]:
    """Parse ``chunk``: its rows (``row_id`` = position in the chunk) and its number of lines.

    ``index0`` / ``line0``: rows and lines of the same file before the chunk, so that errors and
    ``Row.index`` / ``Row.line`` are the file's (only ``jsonl`` chunks need them).
    """
    if chunk.kind == "jsonl":
        file, offset, length = chunk.payload
        with open(file, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"file '{file}' is not valid UTF-8 text: {e.reason} at byte {offset + e.start}") from e
        lines = text.splitlines()
        rows = _read_json_lines(Path(file), lines, index0, line0)
        for i, r in enumerate(rows):
            r.row_id = i
        return rows, len(lines)
    if chunk.kind == "rows":
        rows = [Row(i, r.data, r.source, r.index, r.line) for i, r in enumerate(chunk.payload)]
        return rows, 0
    import pyarrow as pa

    records = pa.ipc.open_stream(chunk.payload).read_all().to_pylist()
    return [Row(i, r, chunk.source, chunk.start + i) for i, r in enumerate(records)], 0


def count_rows(split: Split) -> int:
    """Rows of ``split`` without parsing them where the format allows (JSON lines: non-blank
    lines; Parquet: its metadata; hub: the dataset's length)."""
    if split.hub is not None:
        return len(split.hub)
    total = 0
    for file in split.files:
        suffix = file.suffix.lower()
        if suffix == ".jsonl":
            for offset, length in _line_blocks(file, 8 * CHUNK_BYTES):
                with open(file, "rb") as f:
                    f.seek(offset)
                    text = f.read(length).decode("utf-8", errors="replace")
                total += sum(1 for line in text.splitlines() if line and not line.isspace())
        elif suffix == ".parquet":
            total += _parquet_file(file).metadata.num_rows
        elif suffix == ".csv":
            total += sum(b.num_rows for b in _csv_batches(file))
        else:
            total += len(_read_json(file))
    return total


# ------------------------------------------------------------------------------ file formats
def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"file '{file}' is not valid UTF-8 text: {e}") from e


def _read_json_lines(file: Path, lines: list[str], index0: int = 0, line0: int = 0) -> list[Row]:
    rows: list[Row] = []
    for line_no, line in enumerate(lines, start=line0 + 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"file '{file}', line {line_no} (row {index0 + len(rows)}): invalid JSON: {e.msg} at column {e.colno}"
            ) from e
        if not isinstance(value, dict):
            raise DataError(
                f"file '{file}', line {line_no} (row {index0 + len(rows)}): expected a JSON object, "
                f"got {type(value).__name__}"
            )
        rows.append(Row(row_id=-1, data=value, source=str(file), index=index0 + len(rows), line=line_no))
    return rows


def _is_columnar(value: Any) -> bool:
    """An object of equal-length column lists whose cells are not objects.

    A one-line ``{"messages": [{...}, ...]}`` is a single *row* (its list holds objects),
    whereas ``{"input": ["a", "b"], "output": ["c", "d"]}`` is two rows.
    """
    if not isinstance(value, dict) or not value:
        return False
    cols = list(value.values())
    if not all(isinstance(c, list) for c in cols) or len({len(c) for c in cols}) != 1:
        return False
    return not any(isinstance(cell, dict) for c in cols for cell in c)


def _rows_from_columns(file: Path, columns: dict) -> list[Row]:
    n = len(next(iter(columns.values())))
    return [Row(-1, {k: v[i] for k, v in columns.items()}, str(file), i) for i in range(n)]


def _read_json(file: Path) -> list[Row]:
    """A ``.json`` file: a JSON array of objects, an object of columns, or JSON lines."""
    text = _read_text(file)
    stripped = text.lstrip()
    if not stripped:
        return []
    if stripped[0] == "[":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"file '{file}', line {e.lineno}: invalid JSON: {e.msg} at column {e.colno}") from e
        rows = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise DataError(f"file '{file}', row {i}: expected a JSON object, got {type(item).__name__}")
            rows.append(Row(-1, item, str(file), i))
        return rows
    # JSON lines first (as the datasets library does); a pretty-printed single object spans
    # lines that do not parse alone, so fall back to reading the file as one value.
    try:
        rows = _read_json_lines(file, text.splitlines())
    except DataError as line_error:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise line_error from line_error.__cause__
        if _is_columnar(value):
            return _rows_from_columns(file, value)
        if isinstance(value, dict):
            return [Row(-1, value, str(file), 0)]
        raise
    if len(rows) == 1 and _is_columnar(rows[0].data):
        return _rows_from_columns(file, rows[0].data)
    return rows


def _parquet_file(file: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(file)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError/...; the user needs the file name
        raise DataError(f"file '{file}' is not a readable parquet file (corrupted or truncated?): {e}") from e


def _parquet_batches(file: Path, chunk_rows: int) -> Iterator[Any]:
    pf = _parquet_file(file)
    try:
        yield from pf.iter_batches(batch_size=chunk_rows)
    except Exception as e:
        raise DataError(f"file '{file}' is not a readable parquet file (corrupted or truncated?): {e}") from e


def _csv_batches(file: Path) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.csv as pc

    try:
        with pc.open_csv(file) as reader:
            names = reader.schema.names
        # Every column as a string and empty cells as "", so a numeric-looking column is not
        # silently turned into numbers and an empty cell is reported as "empty", like in JSON.
        reader = pc.open_csv(
            file,
            parse_options=pc.ParseOptions(newlines_in_values=True),
            convert_options=pc.ConvertOptions(
                column_types={n: pa.string() for n in names}, strings_can_be_null=False
            ),
        )
        with reader:
            yield from reader
    except Exception as e:  # pyarrow's CSV errors do not name the file
        raise DataError(f"file '{file}' is not a readable CSV file: {e}") from e


def _load_hub(name: str, split: str):
    not_found = (
        f"'{name}' is neither a local path (no such file or folder) nor a reachable Hugging Face "
        f"hub dataset"
    )
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get(
        "HF_DATASETS_OFFLINE", "") not in ("", "0")
    if offline:
        not_found += " (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set, so only cached hub datasets can load)"
    if not _HUB_ID.match(name) or name.lower().endswith(SUPPORTED_SUFFIXES):
        raise DataError(not_found)
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise DataError(f"{not_found}; the 'datasets' package is not installed") from e
    try:
        return datasets.load_dataset(name, split=split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise DataError(f"hub dataset '{name}': split '{split}' does not exist: {e}") from e
        raise DataError(f"hub dataset '{name}' (split '{split}') could not be loaded: {e}") from e
    except (ConnectionError, FileNotFoundError) as e:
        raise DataError(f"{not_found}: {e}") from e
    except Exception as e:  # datasets raises many types (DatasetNotFoundError, HfHubHTTPError, ...)
        if type(e).__name__ in ("DatasetNotFoundError", "RepositoryNotFoundError", "OfflineModeIsEnabled"):
            raise DataError(f"{not_found}: {e}") from e
        raise DataError(f"hub dataset '{name}' (split '{split}') could not be loaded: {e}") from e

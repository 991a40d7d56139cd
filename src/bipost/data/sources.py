"""Reading raw rows: local files, folders of files, or Hugging Face hub datasets.

Every row keeps ``row_id``, its position in the *original* split (all files of the split
concatenated in sorted order), before any cap, skip or eval hold-out, so that per-row
decisions made later always refer to the source row.

Supported local files: ``.jsonl``, ``.json`` (JSON lines, one JSON array of objects, or
one object of equal-length column lists), ``.parquet`` and ``.csv`` (every CSV cell is read
as a string; an empty cell is the empty string). JSON is parsed with Python's ``json``
module so that a missing key stays distinguishable from a ``null`` value and a corrupted
line is reported with its file and line number.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")

# Files named for these splits are never folded into the "train" fallback of a folder that
# has no train-named file: silently training on test data is worse than an error.
_EVAL_SPLIT_NAMES = ("test", "validation", "valid", "val", "dev", "eval")

# What a hub dataset id can look like ("name" or "owner/name"); anything else that does
# not exist locally is reported as a missing local path without asking the hub.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


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
    path_str = os.fspath(path)
    local = Path(path_str).expanduser()
    if local.is_file():
        if split != "train":
            raise DataError(
                f"'{path_str}' is a single file, which only has the 'train' split; "
                f"split '{split}' does not exist (available: ['train'])"
            )
        return _number(_read_file(local), start=0)
    if local.is_dir():
        return _load_folder(local, split)
    return _load_hub(path_str, split)


def _number(rows: list[Row], start: int) -> list[Row]:
    for i, row in enumerate(rows):
        row.row_id = start + i
    return rows


def _split_name(file: Path) -> str:
    """The split a file is named for: its name up to the first '-', '_' or '.'."""
    return re.split(r"[-_.]", file.name, maxsplit=1)[0]


def _load_folder(folder: Path, split: str) -> list[Row]:
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
    rows: list[Row] = []
    for f in chosen:
        rows.extend(_read_file(f))
    return _number(rows, start=0)


def _read_file(file: Path) -> list[Row]:
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        return _read_json_lines(file, _read_text(file))
    if suffix == ".json":
        return _read_json(file)
    if suffix == ".parquet":
        return _read_parquet(file)
    if suffix == ".csv":
        return _read_csv(file)
    raise DataError(f"file '{file}': unsupported type '{suffix}' (supported: {', '.join(SUPPORTED_SUFFIXES)})")


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"file '{file}' is not valid UTF-8 text: {e}") from e


def _read_json_lines(file: Path, text: str) -> list[Row]:
    rows: list[Row] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"file '{file}', line {line_no} (row {len(rows)}): invalid JSON: {e.msg} at column {e.colno}"
            ) from e
        if not isinstance(value, dict):
            raise DataError(
                f"file '{file}', line {line_no} (row {len(rows)}): expected a JSON object, "
                f"got {type(value).__name__}"
            )
        rows.append(Row(row_id=-1, data=value, source=str(file), index=len(rows), line=line_no))
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
        rows = _read_json_lines(file, text)
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


def _read_parquet(file: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(file).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError/...; the user needs the file name
        raise DataError(f"file '{file}' is not a readable parquet file (corrupted or truncated?): {e}") from e
    return [Row(-1, r, str(file), i) for i, r in enumerate(records)]


def _read_csv(file: Path) -> list[Row]:
    import pyarrow as pa
    import pyarrow.csv as pc

    try:
        with pc.open_csv(file) as reader:
            names = reader.schema.names
        # Every column as a string and empty cells as "", so a numeric-looking column is not
        # silently turned into numbers and an empty cell is reported as "empty", like in JSON.
        table = pc.read_csv(
            file,
            parse_options=pc.ParseOptions(newlines_in_values=True),
            convert_options=pc.ConvertOptions(
                column_types={n: pa.string() for n in names}, strings_can_be_null=False
            ),
        )
        records = table.to_pylist()
    except Exception as e:  # pyarrow's CSV errors do not name the file
        raise DataError(f"file '{file}' is not a readable CSV file: {e}") from e
    return [Row(-1, r, str(file), i) for i, r in enumerate(records)]


def _load_hub(name: str, split: str) -> list[Row]:
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
        ds = datasets.load_dataset(name, split=split)
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
    source = f"hf:{name}[{split}]"
    return [Row(i, dict(r), source, i) for i, r in enumerate(ds.to_list())]

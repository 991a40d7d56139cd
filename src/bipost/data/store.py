"""The token store: examples of any example dataclass as flat, memory-mapped numpy columns.

A store is one folder, written once by :class:`StoreWriter` and then only read (memory-mapped)::

    manifest.json             the example type, its columns (dtype, trailing shape, sizes), the builder's meta
    <field>.values            a ragged field's values, all rows laid end to end (raw little-endian array)
    <field>.offsets           int64 [N + 1]: row i's values are values[offsets[i]:offsets[i + 1]]
    <field>.values            a scalar field: one value per row
    _<name>.values            auxiliary per-row columns and arrays of the builder (not example fields)
    COMPLETE                  written last; a folder without it is never read

Columns come from the example dataclass's annotations (``data/types.py``): ``TokenIds`` and
``Ragged[dtype]`` fields are ragged, ``int``/``float``/``bool`` fields scalar, ``str`` fields
ragged UTF-8 bytes. A new example type is stored by declaring it, nothing here changes.

Reading an example slices the memory maps: its arrays are read-only *views* (no copy), its
scalars Python numbers, its strings ``str``. Opening a store reads only the manifest; the
operating system pages data in as batches touch it, and those pages are shared by every process
that maps the same files (all ranks of a node) and can be dropped under memory pressure. Every
:data:`RELEASE_EVERY` examples the store unmaps what the process touched (the pages stay cached),
so a process's RSS does not grow to the whole data set over an epoch.
Raw arrays rather than Arrow: one example is two offset reads and a slice per field (about a
microsecond), with exactly the dtype chosen (``uint16`` tokens); see docs/data.md.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import mmap
import os
import sys
import typing
from dataclasses import dataclass
from operator import index as as_index
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from bipost.data.types import Ragged

STORE_VERSION = 1
"""Layout version of a store folder (part of the cache key through ``DATA_CODE_VERSION``)."""
MARKER = "COMPLETE"
MANIFEST = "manifest.json"
RELEASE_EVERY = 64
"""Examples read between two :meth:`TokenStore.release` calls (bounds the mapped pages a process holds)."""

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("bipost's token store assumes a little-endian machine")


@dataclass(frozen=True)
class Column:
    """How one field of an example type is stored."""

    name: str
    kind: str
    """``ragged`` (values + offsets), ``scalar`` (one value per row) or ``text`` (ragged UTF-8 bytes)."""
    dtype: str
    """numpy dtype name; ``"token"`` until the store's token dtype is chosen."""
    trailing: tuple[int, ...] = ()
    """Fixed trailing shape of a ragged field's values (``(k,)`` for ``[n_tokens, k]``); set from the data."""


def schema_of(cls: type) -> list[Column]:
    """The columns of example dataclass ``cls``, in field order (see the module docstring)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass: the token store keeps dataclass examples")
    hints = typing.get_type_hints(cls, include_extras=True)
    columns = []
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        marker = next((m for m in getattr(t, "__metadata__", ()) if isinstance(m, Ragged)), None)
        if marker is not None:
            dtype = "token" if marker.dtype == "token" else np.dtype(marker.dtype).name
            columns.append(Column(f.name, "ragged", dtype))
        elif t is bool:
            columns.append(Column(f.name, "scalar", "bool"))
        elif t is int:
            columns.append(Column(f.name, "scalar", "int64"))
        elif t is float:
            columns.append(Column(f.name, "scalar", "float64"))
        elif t is str:
            columns.append(Column(f.name, "text", "uint8"))
        else:
            raise TypeError(
                f"{cls.__name__}.{f.name}: the token store can't keep a field annotated {t!r}; use TokenIds, "
                f"Ragged[<numpy dtype>], int, float, bool or str (see bipost/data/types.py)"
            )
    if not any(c.name == "row_id" and c.dtype == "int64" for c in columns):
        raise TypeError(f"{cls.__name__} needs a 'row_id: int' field (the row's position in the original data)")
    return columns


def token_dtype(vocab_size: int) -> str:
    """The smallest dtype that holds every id of a ``vocab_size`` vocabulary."""
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "int32"


def type_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _import_type(name: str) -> type:
    module, _, qualname = name.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


# ------------------------------------------------------------------------------ columns of a chunk
def to_columns(columns: Sequence[Column], examples: Sequence[Any], token: str | None = None) -> dict[str, tuple]:
    """Examples -> ``{field: (values, lengths)}`` for ragged/text fields and ``{field: (values,)}``
    for scalars. Token fields come out as ``int64``, or checked and narrowed to dtype ``token``
    (a worker narrows before sending its columns: a quarter of the bytes through the pipe)."""
    out: dict[str, tuple] = {}
    for col in columns:
        vals = [getattr(e, col.name) for e in examples]
        if col.kind == "scalar":
            out[col.name] = (np.asarray(vals, dtype=col.dtype),)
        elif col.kind == "text":
            data = [v.encode("utf-8") for v in vals]
            out[col.name] = (np.frombuffer(b"".join(data), dtype=np.uint8), np.array([len(d) for d in data], np.int64))
        else:
            dtype = np.int64 if col.dtype == "token" else np.dtype(col.dtype)
            lengths = np.array([len(v) for v in vals], dtype=np.int64)
            if all(isinstance(v, (tuple, list)) and (not v or not isinstance(v[0], (tuple, list))) for v in vals):
                flat = np.fromiter((x for v in vals for x in v), dtype=dtype, count=int(lengths.sum()))
            else:  # numpy arrays, or nested sequences with a trailing dimension
                parts = [np.asarray(v, dtype=dtype) for v in vals]
                trailing = next((p.shape[1:] for p in parts if len(p)), ())
                parts = [p if len(p) else p.reshape(0, *trailing) for p in parts]
                flat = np.concatenate(parts) if parts else np.zeros(0, dtype)
            if col.dtype == "token" and token is not None:
                flat = _narrow(col.name, flat, token)
            out[col.name] = (flat, lengths)
    return out


def _narrow(name: str, values: np.ndarray, dtype: str) -> np.ndarray:
    """Token ids as ``dtype``; a ``ValueError`` for an id it can't hold."""
    if values.size and values.dtype != np.dtype(dtype):
        info = np.iinfo(dtype)
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi > info.max:
            raise ValueError(f"field '{name}': token id {hi if hi > info.max else lo} does not fit the "
                             f"store's {dtype} (is the tokenizer's len() its real vocabulary size?)")
    return values.astype(dtype, copy=False)


# ------------------------------------------------------------------------------ writing
class StoreWriter:
    """Writes a store into ``folder`` (a fresh temporary folder: the caller renames it into place).

    ``append`` takes the columns of consecutive examples (:func:`to_columns`) plus auxiliary
    per-example columns (``aux``: name -> array, e.g. the builder's truncation flags); ``close``
    adds whole arrays, the builder's ``meta`` and the manifest, and writes ``COMPLETE`` last.
    """

    def __init__(self, folder: Path, cls: type, token_dtype_name: str):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=False)
        self.cls = cls
        self.columns = [dataclasses.replace(c, dtype=token_dtype_name) if c.dtype == "token" else c
                        for c in schema_of(cls)]
        self._token_fields = {c.name for c in schema_of(cls) if c.dtype == "token"}
        self._files: dict[str, Any] = {}
        self._lengths: dict[str, list[np.ndarray]] = {c.name: [] for c in self.columns if c.kind != "scalar"}
        self._counts: dict[str, int] = {}
        self._aux: dict[str, str] = {}
        self.n = 0

    def _write(self, name: str, values: np.ndarray) -> None:
        f = self._files.get(name)
        if f is None:
            f = self._files[name] = open(self.folder / f"{name}.values", "wb")
        f.write(np.ascontiguousarray(values).data)
        self._counts[name] = self._counts.get(name, 0) + len(values)

    def append(self, columns: dict[str, tuple], aux: dict[str, np.ndarray] | None = None) -> None:
        n = len(columns["row_id"][0])
        for i, col in enumerate(self.columns):
            values = columns[col.name][0]
            if col.name in self._token_fields:
                values = _narrow(col.name, values, col.dtype)
            if col.kind == "ragged" and values.ndim > 1:
                trailing = tuple(values.shape[1:])
                if self.n == 0 and not col.trailing:
                    col = self.columns[i] = dataclasses.replace(col, trailing=trailing)
                elif trailing != col.trailing:
                    raise ValueError(f"field '{col.name}': rows from {self.n} have trailing shape {trailing}, "
                                     f"earlier rows {col.trailing}; a ragged field's trailing shape is fixed")
            self._write(col.name, values.astype(col.dtype, copy=False))
            if col.kind != "scalar":
                lengths = columns[col.name][1]
                if len(lengths) != n:
                    raise ValueError(f"field '{col.name}': {len(lengths)} lengths for {n} examples")
                self._lengths[col.name].append(lengths)
        for name, values in (aux or {}).items():
            if len(values) != n:
                raise ValueError(f"auxiliary column '{name}': {len(values)} values for {n} examples")
            self._aux[name] = values.dtype.name
            self._write(f"_{name}", values)
        self.n += n

    def close(self, meta: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
        """Finish the store: offsets, whole ``arrays``, manifest, fsync, then ``COMPLETE``."""
        for col in self.columns:
            if col.name not in self._files:  # no example at all: empty files keep the layout uniform
                self._write(col.name, np.zeros((0, *col.trailing), dtype=col.dtype))
        for name, dtype in self._aux.items():
            if f"_{name}" not in self._files:
                self._write(f"_{name}", np.zeros(0, dtype))
        for name, lengths in self._lengths.items():
            offsets = np.zeros(self.n + 1, dtype=np.int64)
            if lengths:
                np.cumsum(np.concatenate(lengths), out=offsets[1:])
            with open(self.folder / f"{name}.offsets", "wb") as f:
                f.write(offsets.data)
        whole = {}
        for name, values in (arrays or {}).items():
            values = np.ascontiguousarray(values)
            with open(self.folder / f"_{name}.values", "wb") as f:
                f.write(values.data)
            whole[name] = {"dtype": values.dtype.name, "shape": list(values.shape)}
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        manifest = {
            "store_version": STORE_VERSION, "example": type_name(self.cls), "n": self.n,
            "columns": [{**dataclasses.asdict(c), "trailing": list(c.trailing), "count": self._counts[c.name]}
                        for c in self.columns],
            "aux": self._aux, "arrays": whole, "meta": meta,
        }
        (self.folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync_folder_files(self.folder)
        (self.folder / MARKER).write_text("")
        _fsync_folder_files(self.folder, only=MARKER)


def _fsync_folder_files(folder: Path, only: str | None = None) -> None:
    for p in folder.iterdir():
        if only is None or p.name == only:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ reading
class StoreError(RuntimeError):
    """A store folder that is incomplete, damaged or of another layout."""


def _map(path: Path, dtype: str, shape: tuple[int, ...], maps: list) -> np.ndarray:
    """A read-only array over ``path`` (no copy); its ``mmap`` is appended to ``maps``."""
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    try:
        size = path.stat().st_size
    except FileNotFoundError as e:
        raise StoreError(f"{path} is missing") from e
    if size != expected:
        raise StoreError(f"{path} has {size} bytes, the manifest says {expected}")
    if expected == 0:
        return np.zeros(shape, dtype=dtype)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mm, "madvise"):
        # Training reads examples in random order: no read-ahead and no fault-around, so a
        # process maps only the pages it touches.
        mm.madvise(mmap.MADV_RANDOM)
    maps.append(mm)
    return np.frombuffer(mm, dtype=dtype).reshape(shape)


class TokenStore:
    """An opened (complete) store: its columns as memory maps, and its examples by position."""

    def __init__(self, path: str | os.PathLike, cls: type | None = None):
        self.path = Path(path)
        if not (self.path / MARKER).is_file():
            raise StoreError(f"{self.path} is not a complete token store (no {MARKER} marker)")
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise StoreError(f"{self.path}: unreadable manifest: {e}") from e
        if manifest.get("store_version") != STORE_VERSION:
            raise StoreError(f"{self.path}: store layout {manifest.get('store_version')}, expected {STORE_VERSION}")
        self.manifest = manifest
        self.meta: dict = manifest["meta"]
        self.cls = cls if cls is not None else _import_type(manifest["example"])
        if type_name(self.cls) != manifest["example"]:
            raise StoreError(f"{self.path} holds {manifest['example']} examples, not {type_name(self.cls)}")
        self.n: int = manifest["n"]
        self.columns = [Column(c["name"], c["kind"], c["dtype"], tuple(c["trailing"])) for c in manifest["columns"]]
        if [(c.name, c.kind) for c in self.columns] != [(c.name, c.kind) for c in schema_of(self.cls)]:
            raise StoreError(f"{self.path}: its columns differ from {self.cls.__name__}'s fields")
        self._maps: list[mmap.mmap] = []
        self._reads = 0
        self.values: dict[str, np.ndarray] = {}
        self.offsets: dict[str, np.ndarray] = {}
        for c, spec in zip(self.columns, manifest["columns"]):
            self.values[c.name] = _map(self.path / f"{c.name}.values", c.dtype, (spec["count"], *c.trailing), self._maps)
            if c.kind != "scalar":
                self.offsets[c.name] = _map(self.path / f"{c.name}.offsets", "int64", (self.n + 1,), self._maps)
                if self.n and int(self.offsets[c.name][-1]) != spec["count"]:
                    raise StoreError(f"{self.path}: offsets of '{c.name}' do not end at its {spec['count']} values")
        self.aux = {name: _map(self.path / f"_{name}.values", dtype, (self.n,), self._maps)
                    for name, dtype in manifest["aux"].items()}
        self.arrays = {name: _map(self.path / f"_{name}.values", a["dtype"], tuple(a["shape"]), self._maps)
                       for name, a in manifest["arrays"].items()}
        self._readers = [self._reader(c) for c in self.columns]
        self._names = [c.name for c in self.columns]

    def _reader(self, c: Column) -> Callable[[int], Any]:
        values = self.values[c.name]
        if c.kind == "scalar":
            return lambda i: values[i].item()
        off = self.offsets[c.name]
        if c.kind == "text":
            return lambda i: values[off[i]:off[i + 1]].tobytes().decode("utf-8")
        return lambda i: values[off[i]:off[i + 1]]

    def __len__(self) -> int:
        return self.n

    @property
    def row_ids(self) -> np.ndarray:
        """``int64 [N]``: every example's row id (ascending in a built store)."""
        return self.values["row_id"]

    def example(self, i: int) -> Any:
        """Example ``i`` (0 <= i < N): an instance of the store's example type over views of the maps."""
        self._reads += 1
        if self._reads % RELEASE_EVERY == 0:
            self.release()
        return self.cls(**{name: read(i) for name, read in zip(self._names, self._readers)})

    def release(self) -> None:
        """Unmap the pages this process has touched (``MADV_DONTNEED``). They stay in the page cache,
        shared with every process mapping the store, and are mapped again when read: the process's
        RSS holds only its recent examples, not every page an epoch has touched. Arrays read before
        stay valid."""
        for mm in self._maps:
            if hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_DONTNEED)

    def lengths(self, name: str) -> np.ndarray:
        """``int64 [N]``: the length of ragged field ``name`` in every example."""
        return np.diff(self.offsets[name])

    def view(self, index: np.ndarray | None = None) -> "ExampleView":
        return ExampleView(self, index)

    def __reduce__(self):  # pickles as its path: the receiver maps the same files
        return (TokenStore, (str(self.path), self.cls))


class ExampleView(Sequence):
    """The examples of a store at ``index`` (all of them when ``None``), as a read-only sequence.

    This is what ``ObjectiveData.train`` / ``.eval`` are: ``len``, ``view[i]`` (an example),
    ``view[a:b]`` / ``view[index_array]`` (a sub-view, no copy of any token), iteration, and
    :attr:`row_ids` for per-row consumers (the selector) that need no example objects.
    """

    def __init__(self, store: TokenStore, index: np.ndarray | None = None):
        self.store = store
        self.index = None if index is None else np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return self.store.n if self.index is None else len(self.index)

    def _pos(self, i: int) -> int:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"example {i} out of range for {n} examples")
        return i if self.index is None else int(self.index[i])

    def __getitem__(self, key):
        if isinstance(key, slice) or (isinstance(key, (np.ndarray, list)) and not isinstance(key, str)):
            base = np.arange(self.store.n, dtype=np.int64) if self.index is None else self.index
            return ExampleView(self.store, base[key])
        return self.store.example(self._pos(as_index(key)))

    def __iter__(self) -> Iterator[Any]:
        example = self.store.example
        if self.index is None:
            return (example(i) for i in range(self.store.n))
        return (example(int(i)) for i in self.index)

    @property
    def row_ids(self) -> np.ndarray:
        """``int64 [len(self)]``: the examples' original row ids, in view order."""
        ids = self.store.row_ids
        return ids if self.index is None else ids[self.index]

    def positions(self, row_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Positions in this view of the examples with ``row_ids``; a ``KeyError`` for a row id it lacks."""
        mine = self.row_ids
        want = np.asarray(row_ids, dtype=np.int64).reshape(-1)
        order = np.argsort(mine, kind="stable")
        found = np.searchsorted(mine[order], want).clip(max=max(len(mine) - 1, 0))
        if len(mine) == 0 or not np.array_equal(mine[order][found], want):
            missing = want if len(mine) == 0 else want[mine[order][found] != want]
            raise KeyError(f"row ids {missing[:5].tolist()} are not in these examples")
        return order[found]

    def __repr__(self) -> str:
        return f"ExampleView({len(self)} {self.store.cls.__name__} of {self.store.path})"


class Concat(Sequence):
    """Several example sequences read as one (e.g. train + eval for a reference cache pass), by
    position, without materialising a list of examples."""

    def __init__(self, *parts: Sequence[Any]):
        self.parts = parts
        self._ends = np.cumsum([len(p) for p in parts], dtype=np.int64)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = as_index(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} out of range for {len(self)} examples")
        k = int(np.searchsorted(self._ends, i, side="right"))
        return self.parts[k][i - (int(self._ends[k - 1]) if k else 0)]

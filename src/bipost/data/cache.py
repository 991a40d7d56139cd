"""Where token stores live, what they are keyed by, and how one process builds while others wait.

A store's folder is ``<data.cache_dir>/<key>``, where ``key`` hashes everything that changes
its contents (:func:`store_key`): the source's bytes (each file's content hash; a hub
dataset's fingerprint), split, ``max_samples``, format and its keys and template, the
tokenizer (its full serialization, chat template and special tokens), ``max_len``, the
objective kind and example type, and :data:`DATA_CODE_VERSION`. Anything else (eval hold-out,
seed, ``num_proc``, the file's name or folder) leaves the key alone, so ``compare`` methods,
λ sweeps and later runs reuse the store; a changed input makes a new key, so a stale store is
never read (it stays on disk until the cache folder is cleaned; deleting it is always safe
while no run uses it).

A file's content hash (xxh3-128, at disk speed) is remembered beside the stores by the file's
identity and stamps (path, device, inode, size, mtime and ctime in ns, as git's index does), so a
relaunch does not read the data again; a file changed in any way gets a new stamp and is hashed
again. Stamps of a file modified less than 2 s before hashing are not remembered (a write in
the same clock tick could keep them).

Building is atomic and exclusive: under an ``fcntl`` lock on ``<key>.lock`` in the cache
folder, the builder writes ``.tmp-<key>-<pid>`` and renames it to ``<key>`` once it holds the
``COMPLETE`` marker. Every rank of a job (and every separate process on the machine, or on any
machine sharing the folder) takes the same lock: the first builds, the others wait and then map
the finished files. A build killed halfway leaves only a ``.tmp-`` folder (removed by the next
builder) and its lock is released by the kernel.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from bipost.data.sources import Split
from bipost.data.store import StoreError, TokenStore

logger = logging.getLogger("bipost")

DATA_CODE_VERSION = 1
"""Version of everything between raw rows and stored tokens (readers, formats, the token policy,
the store layout). Bump it whenever a change would give different examples for the same inputs."""

ENV_CACHE = "BIPOST_CACHE"
"""Environment variable: root of bipost's caches; token stores go to ``$BIPOST_CACHE/data``."""

_HASH_BLOCK = 8 << 20


def default_cache_dir() -> Path:
    """``$BIPOST_CACHE/data``, else ``$XDG_CACHE_HOME/bipost/data`` (``~/.cache/bipost/data``)."""
    root = os.environ.get(ENV_CACHE)
    if root:
        return Path(root).expanduser() / "data"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "bipost" / "data"


def resolve_cache_dir(cache_dir: str | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------ fingerprints
def file_digest(path: Path, memo_dir: Path | None = None) -> str:
    """xxh3-128 of the file's bytes, remembered in ``memo_dir`` by the file's stamps."""
    import xxhash

    st = path.stat()
    stamp = [str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    memo = memo_dir / f"{_sha(stamp[0])[:32]}.json" if memo_dir is not None else None
    if memo is not None:
        try:
            saved = json.loads(memo.read_text())
            if saved["stamp"] == stamp:
                return saved["digest"]
        except (OSError, ValueError, KeyError):
            pass
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    digest = h.hexdigest()
    if memo is not None and time.time() - st.st_mtime > 2.0:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"stamp": stamp, "digest": digest}))
        os.replace(tmp, memo)
    return digest


def source_fingerprint(split: Split, memo_dir: Path | None = None) -> dict:
    """What the rows of ``split`` are: its files' types and contents in order, or the hub dataset's
    fingerprint (``datasets`` changes it whenever the cached data changes)."""
    if split.hub is not None:
        ds = split.hub
        return {"hub": split.path, "split": split.split, "rows": len(ds),
                "fingerprint": getattr(ds, "_fingerprint", None) or _sha([str(f) for f in ds.cache_files])}
    return {"files": [[f.suffix.lower(), f.stat().st_size, file_digest(f, memo_dir)] for f in split.files]}


def tokenizer_fingerprint(tokenizer: Any) -> dict:
    """Everything of the tokenizer that changes token ids: its full serialization (vocabulary,
    merges, normalizer, pre-tokenizer, added tokens), chat template and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = hashlib.sha256(backend.to_str().encode()).hexdigest()
    else:
        model = _sha([sorted(tokenizer.get_vocab().items()), repr(sorted(getattr(tokenizer, "init_kwargs", {}).items()))])
    template = getattr(tokenizer, "chat_template", None)
    return {
        "class": type(tokenizer).__name__,
        "model": model,
        "size": len(tokenizer),
        "chat_template": _sha(template) if template else None,
        "specials": [getattr(tokenizer, f"{t}_token_id", None) for t in ("bos", "eos", "pad")],
    }


def store_key(fields: dict) -> str:
    """The folder name of the store described by ``fields`` (with :data:`DATA_CODE_VERSION`)."""
    return _sha({"data_code_version": DATA_CODE_VERSION, **fields})[:40]


# ------------------------------------------------------------------------------ build once
@contextlib.contextmanager
def _exclusive(lock: Path, what: str) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no cross-process lock
        yield
        return
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process to finish building %s", what)
            t0 = time.perf_counter()
            fcntl.flock(fd, fcntl.LOCK_EX)
            logger.info("waited %.1f s for %s", time.perf_counter() - t0, what)
        yield
    finally:
        os.close(fd)  # releases the lock


def _open(folder: Path, cls: type) -> TokenStore | None:
    if not folder.exists():
        return None
    try:
        return TokenStore(folder, cls)
    except StoreError as e:
        logger.warning("token store %s can't be used (%s); rebuilding it", folder, e)
        return None


def load_or_build(cache_dir: Path, key: str, cls: type, build: Callable[[Path], None]) -> tuple[TokenStore, bool]:
    """The complete store ``<cache_dir>/<key>``, built by ``build(tmp_folder)`` if there is none.

    Returns ``(store, built)``: ``built`` is False when the store was already there (or another
    process built it while this one waited for the lock).
    """
    final = cache_dir / key
    store = _open(final, cls)
    if store is not None:
        return store, False
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(cache_dir / f"{key}.lock", str(final)):
        store = _open(final, cls)
        if store is not None:
            return store, False
        if final.exists():  # incomplete or damaged, and only the lock holder may touch it
            shutil.rmtree(final)
        for leftover in cache_dir.glob(f".tmp-{key}-*"):  # a killed build's
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = cache_dir / f".tmp-{key}-{os.getpid()}"
        try:
            build(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fd = os.open(cache_dir, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself is durable before anyone is told the store exists
        finally:
            os.close(fd)
    return TokenStore(final, cls), True

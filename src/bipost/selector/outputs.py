"""What the selector writes: weights files, a summary (histogram + top/bottom rows) and ``meta.json``.

A weights file has one row per weighted training row, sorted by rank, with the columns

    row_id  (int)    the row's position in the original split (see ``bipost.data.sources``)
    logit   (float)  the selector's fp32 logit
    weight  (float)  the activated weight (softmax: mean 1; sigmoid: in (0, 2))
    rank    (int)    1 = highest weight (ties: lower row id first)

as Parquet (``weights.parquet``; the metadata is also in its schema under ``bipost.selector``)
and/or JSON lines (``weights.jsonl``). ``meta.json`` beside it says which data the ids refer to,
so ``bipost select filter`` can find the dataset by itself. Files are written atomically.

Columns travel as numpy arrays (``SelectorWeights.table``): a million rows are 32 MB, not four
million Python objects; JSON lines are written and read in blocks of :data:`BLOCK` rows.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

COLUMNS = ("row_id", "logit", "weight", "rank")
DTYPES = {"row_id": "int64", "logit": "float64", "weight": "float64", "rank": "int64"}
META_KEY = b"bipost.selector"
BLOCK = 65536
"""Rows per block when writing or reading JSON lines."""


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    write(tmp)
    os.replace(tmp, path)


def _columns(table: dict) -> dict[str, np.ndarray]:
    return {c: np.asarray(table[c], dtype=DTYPES[c]) for c in COLUMNS}


def write_weights(table: dict, folder: Path, formats: list[str], meta: dict) -> list[Path]:
    """Write ``weights.<fmt>`` for each format and ``meta.json`` into ``folder``; returns the weights files.

    ``table``: the columns (numpy arrays or lists), sorted by rank."""
    folder.mkdir(parents=True, exist_ok=True)
    cols = _columns(table)
    written = []
    if "parquet" in formats:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([(c, pa.from_numpy_dtype(np.dtype(DTYPES[c]))) for c in COLUMNS],
                           metadata={META_KEY: json.dumps(meta).encode()})
        arrow = pa.table({c: cols[c] for c in COLUMNS}, schema=schema)
        path = folder / "weights.parquet"
        _atomic_write(path, lambda p: pq.write_table(arrow, p))
        written.append(path)
    if "jsonl" in formats:
        path = folder / "weights.jsonl"

        def lines(p: Path) -> None:
            with open(p, "w", encoding="utf-8") as f:
                for a in range(0, len(cols["row_id"]), BLOCK):
                    block = [cols[c][a:a + BLOCK].tolist() for c in COLUMNS]
                    f.write("".join(json.dumps(dict(zip(COLUMNS, vals))) + "\n" for vals in zip(*block)))

        _atomic_write(path, lines)
        written.append(path)
    _atomic_write(folder / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return written


def find_weights_file(path: str | Path) -> Path:
    """``path`` itself, or the weights file inside a folder (a selector folder or a run directory)."""
    path = Path(path)
    if path.is_file():
        return path
    for folder in (path, path / "selector"):
        for name in ("weights.parquet", "weights.jsonl"):
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(f"no selector weights file at {path} (expected a weights.parquet / weights.jsonl "
                            f"file, or a folder holding one)")


def read_weights(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """Columns of a weights file (``.parquet`` or ``.jsonl``, or a folder holding one) as numpy arrays,
    and its metadata (from ``meta.json`` beside it, else the Parquet schema; ``{}`` when there is none)."""
    file = find_weights_file(path)
    meta: dict = {}
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        arrow = pq.read_table(file)
        missing = [c for c in COLUMNS if c not in arrow.column_names]
        if missing:
            raise ValueError(f"{file} is not a selector weights file: columns {missing} are missing")
        table = {c: np.asarray(arrow.column(c).to_numpy(), dtype=DTYPES[c]) for c in COLUMNS}
        raw = (arrow.schema.metadata or {}).get(META_KEY)
        meta = json.loads(raw) if raw else {}
    elif file.suffix == ".jsonl":
        blocks = list(_jsonl_blocks(file))
        table = {c: np.concatenate([b[c] for b in blocks]) if blocks else np.zeros(0, DTYPES[c]) for c in COLUMNS}
    else:
        raise ValueError(f"{file}: weights files are .parquet or .jsonl")
    side = file.parent / "meta.json"
    if side.is_file():
        meta = json.loads(side.read_text())
    return table, meta


def _jsonl_blocks(file: Path) -> Iterator[dict[str, np.ndarray]]:
    block: dict[str, list] = {c: [] for c in COLUMNS}
    with open(file, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            rec = json.loads(line)
            missing = [c for c in COLUMNS if c not in rec]
            if missing:
                raise ValueError(f"{file}, line {i}: not a selector weights row: {missing} missing")
            for c in COLUMNS:
                block[c].append(rec[c])
            if len(block["row_id"]) == BLOCK:
                yield {c: np.asarray(v, dtype=DTYPES[c]) for c, v in block.items()}
                block = {c: [] for c in COLUMNS}
    if block["row_id"]:
        yield {c: np.asarray(v, dtype=DTYPES[c]) for c, v in block.items()}


# ---------------------------------------------------------------------------------- summary

def _stats(weights) -> dict[str, float]:
    w = np.asarray(weights, dtype=np.float64)
    q = np.quantile(w, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"mean": float(w.mean()), "std": float(w.std()), "min": float(w.min()), "max": float(w.max()),
            "q05": float(q[0]), "q25": float(q[1]), "median": float(q[2]), "q75": float(q[3]), "q95": float(q[4])}


def plot_histogram(weights, path: Path, title: str) -> None:
    """A PNG histogram of the weights (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    ax.hist(weights, bins=min(60, max(10, int(math.sqrt(len(weights))))), color="#4c72b0", edgecolor="white")
    ax.set_xlabel("weight")
    ax.set_ylabel("rows")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def write_summary(table: dict, folder: Path, title: str, meta: dict, n_rows: int,
                  text_of: Callable[[int], dict[str, str]]) -> dict:
    """``summary.json``, ``summary.md`` and ``weights_hist.png`` in ``folder``.

    ``table`` is sorted by rank; ``text_of(row_id)`` gives a row's text fields (e.g. prompt,
    response); the ``n_rows`` highest and lowest weighted rows are listed with them.
    """
    folder.mkdir(parents=True, exist_ok=True)
    n = len(table["row_id"])

    def entries(idx: range) -> list[dict]:
        return [{"rank": int(table["rank"][i]), "row_id": int(table["row_id"][i]), "weight": float(table["weight"][i]),
                 "logit": float(table["logit"][i]), "text": text_of(int(table["row_id"][i]))} for i in idx]

    top = entries(range(min(n_rows, n)))
    bottom = entries(range(n - 1, max(n - n_rows, 0) - 1, -1))
    summary = {**meta, "rows": n, "weight": _stats(table["weight"]), "top": top, "bottom": bottom}
    _atomic_write(folder / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))
    plot_histogram(table["weight"], folder / "weights_hist.png", title)

    s = summary["weight"]
    md = [f"# {title}", "",
          f"{n} rows of `{meta.get('data_path', '?')}` weighted by the selector ({meta.get('activation')}); "
          f"step {meta.get('step')}.", "",
          f"weight: mean {s['mean']:.4f}, std {s['std']:.4f}, min {s['min']:.4f}, "
          f"5% {s['q05']:.4f}, median {s['median']:.4f}, 95% {s['q95']:.4f}, max {s['max']:.4f}", "",
          "![weights](weights_hist.png)", ""]
    for name, rows in (("Highest weights", top), ("Lowest weights (filtered out first)", bottom)):
        md += [f"## {name}", "", "| rank | row_id | weight | text |", "|---:|---:|---:|---|"]
        for e in rows:
            text = " ⏎ ".join(f"**{k}**: {_short(v)}" for k, v in e["text"].items()).replace("|", "\\|")
            md.append(f"| {e['rank']} | {e['row_id']} | {e['weight']:.4f} | {text} |")
        md.append("")
    _atomic_write(folder / "summary.md", lambda p: p.write_text("\n".join(md), encoding="utf-8"))
    return summary

"""What the selector writes: weights files, a summary (histogram + top/bottom rows) and ``meta.json``.

A weights file has one row per weighted training row, sorted by rank, with the columns

    row_id  (int)    the row's position in the original split (see ``bipost.data.sources``)
    logit   (float)  the selector's fp32 logit
    weight  (float)  the activated weight (softmax: mean 1; sigmoid: in (0, 2))
    rank    (int)    1 = highest weight (ties: lower row id first)

as Parquet (``weights.parquet``; the metadata is also in its schema under ``bipost.selector``)
and/or JSON lines (``weights.jsonl``). ``meta.json`` beside it says which data the ids refer to,
so ``bipost select filter`` can find the dataset by itself. Files are written atomically.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

COLUMNS = ("row_id", "logit", "weight", "rank")
META_KEY = b"bipost.selector"


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    write(tmp)
    os.replace(tmp, path)


def write_weights(table: dict[str, list], folder: Path, formats: list[str], meta: dict) -> list[Path]:
    """Write ``weights.<fmt>`` for each format and ``meta.json`` into ``folder``; returns the weights files."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if "parquet" in formats:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("row_id", pa.int64()), ("logit", pa.float64()), ("weight", pa.float64()),
                            ("rank", pa.int64())], metadata={META_KEY: json.dumps(meta).encode()})
        arrow = pa.table({c: table[c] for c in COLUMNS}, schema=schema)
        path = folder / "weights.parquet"
        _atomic_write(path, lambda p: pq.write_table(arrow, p))
        written.append(path)
    if "jsonl" in formats:
        path = folder / "weights.jsonl"
        lines = "".join(json.dumps(dict(zip(COLUMNS, vals))) + "\n" for vals in zip(*(table[c] for c in COLUMNS)))
        _atomic_write(path, lambda p: p.write_text(lines, encoding="utf-8"))
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


def read_weights(path: str | Path) -> tuple[dict[str, list], dict]:
    """Columns of a weights file (``.parquet`` or ``.jsonl``, or a folder holding one) and its metadata
    (from ``meta.json`` beside it, else the Parquet schema; ``{}`` when there is none)."""
    file = find_weights_file(path)
    meta: dict = {}
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        arrow = pq.read_table(file)
        missing = [c for c in COLUMNS if c not in arrow.column_names]
        if missing:
            raise ValueError(f"{file} is not a selector weights file: columns {missing} are missing")
        table = {c: arrow.column(c).to_pylist() for c in COLUMNS}
        raw = (arrow.schema.metadata or {}).get(META_KEY)
        meta = json.loads(raw) if raw else {}
    elif file.suffix == ".jsonl":
        table = {c: [] for c in COLUMNS}
        for i, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            rec = json.loads(line)
            missing = [c for c in COLUMNS if c not in rec]
            if missing:
                raise ValueError(f"{file}, line {i}: not a selector weights row: {missing} missing")
            for c in COLUMNS:
                table[c].append(rec[c])
    else:
        raise ValueError(f"{file}: weights files are .parquet or .jsonl")
    side = file.parent / "meta.json"
    if side.is_file():
        meta = json.loads(side.read_text())
    return table, meta


# ---------------------------------------------------------------------------------- summary

def _stats(weights: list[float]) -> dict[str, float]:
    import numpy as np

    w = np.asarray(weights, dtype=np.float64)
    q = np.quantile(w, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"mean": float(w.mean()), "std": float(w.std()), "min": float(w.min()), "max": float(w.max()),
            "q05": float(q[0]), "q25": float(q[1]), "median": float(q[2]), "q75": float(q[3]), "q95": float(q[4])}


def plot_histogram(weights: list[float], path: Path, title: str) -> None:
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


def write_summary(table: dict[str, list], folder: Path, title: str, meta: dict, n_rows: int,
                  text_of: Callable[[int], dict[str, str]]) -> dict:
    """``summary.json``, ``summary.md`` and ``weights_hist.png`` in ``folder``.

    ``table`` is sorted by rank; ``text_of(row_id)`` gives a row's text fields (e.g. prompt,
    response); the ``n_rows`` highest and lowest weighted rows are listed with them.
    """
    folder.mkdir(parents=True, exist_ok=True)
    n = len(table["row_id"])

    def entries(idx: range) -> list[dict]:
        return [{"rank": table["rank"][i], "row_id": table["row_id"][i], "weight": table["weight"][i],
                 "logit": table["logit"][i], "text": text_of(table["row_id"][i])} for i in idx]

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

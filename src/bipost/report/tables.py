"""Comparison tables: one row per method (or per method and lambda), as Markdown and JSON.

Costs are wall time of the training steps (evaluations excluded; MAXRIGHT's no-grad refreshes
included, since they are part of its method) and tokens trained on (non-padding tokens of the
micro-batches that took a gradient step), each also relative to ``sequential``.

Next to the losses, a row holds the *measures* the run's ``eval`` section took at its last
evaluation (:func:`measure_keys`): every benchmark score (``bench/<task>/<metric>``) and each
objective's exact match, token F1 and win rate (``gen/<objective>/<metric>``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    from bipost.report.compare import MethodResult


def distance(final: Mapping[str, float], ideal: Mapping[str, float | None], names: Sequence[str]) -> float | None:
    """Euclidean distance from the final losses to the ideal point (None when some f* is unknown)."""
    if any(ideal.get(n) is None or n not in final for n in names):
        return None
    return math.sqrt(sum((final[n] - ideal[n]) ** 2 for n in names))  # type: ignore[operator]


MEASURES = ("exact_match", "f1", "win_rate")
"""Generation metrics (``gen/<objective>/<metric>``) that comparisons report."""


def is_measure(key: str) -> bool:
    """A benchmark score, or a generation metric of :data:`MEASURES`."""
    return key.startswith("bench/") or (key.startswith("gen/") and key.rsplit("/", 1)[-1] in MEASURES)


def measure_keys(finals: Sequence[Mapping[str, Any]]) -> list[str]:
    """The measures present in any of ``finals`` (each run's last evaluation): benchmarks first
    (sorted), then generation metrics in the order they appear."""
    seen: list[str] = []
    for final in finals:
        seen += [k for k in final if is_measure(k) and k not in seen]
    return sorted(k for k in seen if k.startswith("bench/")) + [k for k in seen if k.startswith("gen/")]


def measure_label(key: str) -> str:
    """``bench/arc_easy/acc_norm`` -> ``arc_easy acc norm``; ``gen/dpo/win_rate`` -> ``dpo win rate``
    (the task or objective name as it is)."""
    parts = key.split("/")[1:]
    if not parts:
        return key
    return " ".join([parts[0], *(p.replace("_", " ") for p in parts[1:])])


def comparison_rows(results: Sequence["MethodResult"], names: Sequence[str],
                    ideal: Mapping[str, float | None], baseline: str = "sequential") -> list[dict[str, Any]]:
    """One dict per method: final losses, distance to the ideal point, the measures (benchmarks,
    generation metrics; None where a run lacks one), steps each objective ran, wall time and tokens,
    and both costs relative to ``baseline`` (when it is among the results)."""
    base = next((r for r in results if r.method == baseline), None)
    measures = measure_keys([r.final for r in results])
    rows = []
    for r in results:
        final = r.final
        row: dict[str, Any] = {"method": r.method}
        if r.lam is not None:
            row["lambda"] = r.lam
        row.update({f"f_{n}": final.get(n) for n in names})
        row["distance_to_ideal"] = distance(final, ideal, names)
        row.update({k: final.get(k) for k in measures})
        row.update({f"steps_{n}": r.ran.get(n, 0) for n in names})
        row.update(steps=r.steps, wall_time_s=r.wall_time, tokens=r.tokens,
                   time_vs_sequential=r.wall_time / base.wall_time if base and base.wall_time > 0 else None,
                   tokens_vs_sequential=r.tokens / base.tokens if base and base.tokens > 0 else None,
                   stopped_early=r.stopped_early, output_dir=str(r.output_dir))
        rows.append(row)
    return rows


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "loss":
        return f"{value:.4f}"
    if kind == "score":
        return f"{value:.3f}"
    if kind == "ratio":
        return f"{value:.2f}×"
    if kind == "time":
        return f"{value:.1f}"
    if kind == "int":
        return f"{int(value):,}"
    return str(value)


def markdown(rows: Sequence[Mapping[str, Any]], names: Sequence[str],
             measured: Mapping[str, str] | None = None) -> str:
    """A Markdown table of ``comparison_rows`` output; ``measured``: objective -> what its held-out
    value is (``loss``, the default; ``-reward`` for grpo: ``Objective.measure_name``)."""
    measured = measured or {}
    cols: list[tuple[str, str, str]] = [("method", "method", "str")]
    if rows and "lambda" in rows[0]:
        cols.append(("lambda", f"λ ({names[0]})", "str"))
    cols += [(f"f_{n}", f"final {n} {measured.get(n, 'loss')}", "loss") for n in names]
    cols.append(("distance_to_ideal", "distance to ideal", "loss"))
    cols += [(k, measure_label(k), "score") for k in measure_keys(rows)]
    cols += [("steps_ran", "steps (" + " / ".join(names) + ")", "str"),
             ("wall_time_s", "wall time (s)", "time"), ("time_vs_sequential", "time vs seq.", "ratio"),
             ("tokens", "tokens", "int"), ("tokens_vs_sequential", "tokens vs seq.", "ratio")]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |",
             "|" + "|".join("---" if k == "str" else "---:" for _, _, k in cols) + "|"]
    for row in rows:
        cells = []
        for key, _, kind in cols:
            value = " / ".join(str(row.get(f"steps_{n}", 0)) for n in names) if key == "steps_ran" else row.get(key)
            cells.append(_fmt(value, kind))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_json(path: str | Path, payload: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path

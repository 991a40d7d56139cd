"""Loss-space plots: where each method's held-out losses go, one axis per objective.

Drawn on a bare matplotlib ``Figure`` (rendered by Agg; no display, no pyplot state). With more
than two objectives each pair of objectives gets its own panel.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Mapping, Sequence

COLORS = {"sequential": "#d62728", "mix": "#9467bd", "alright": "#1f77b4", "maxright": "#2ca02c",
          "single": "#7f7f7f"}
"""A fixed color per method, so every plot reads the same."""
_EXTRA = ["#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def method_color(method: str, index: int = 0) -> str:
    return COLORS.get(method, _EXTRA[index % len(_EXTRA)])


def _figure(n_panels: int):
    # A bare Figure (no pyplot): nothing global changes, no display is needed, and savefig renders
    # with Agg for PNG whatever backend the caller's process uses.
    from matplotlib.figure import Figure

    cols = min(n_panels, 3)
    rows = (n_panels + cols - 1) // cols
    fig = Figure(figsize=(7.2 * cols, 5.6 * rows), layout="tight")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _finish(fig, axes, n_used: int, title: str, path: str | Path) -> Path:
    for ax in axes[n_used:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10.5)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path


def _mark_ideal(ax, ideal: Mapping[str, float | None], a: str, b: str) -> None:
    if ideal.get(a) is None or ideal.get(b) is None:
        return
    x, y = ideal[a], ideal[b]
    ax.scatter([x], [y], marker="*", s=260, color="gold", edgecolor="black", zorder=6,
               label=f"ideal point ({x:.3f}, {y:.3f})")
    ax.axvline(x, color="0.6", lw=0.8, ls=":", zorder=0)
    ax.axhline(y, color="0.6", lw=0.8, ls=":", zorder=0)


def plot_trajectories(trajectories: Mapping[str, Sequence[Mapping[str, float]]], names: Sequence[str],
                      path: str | Path, ideal: Mapping[str, float | None] | None = None,
                      labels: Mapping[str, str] | None = None, title: str = "",
                      marks: Mapping[str, Sequence[tuple[int, str]]] | None = None,
                      axis_label: Callable[[str], str] | None = None) -> Path:
    """Each method's held-out losses over its evaluations, as a path in (f_a, f_b) for every pair of
    objectives: an arrow per evaluation interval, the end point large, the shared start hollow.
    ``marks``: method -> [(step, text)] written next to the evaluation at that step (e.g. where
    sequential switches objective).

    ``trajectories``: method -> evaluations (dicts with one loss per objective name, in order);
    ``labels``: method -> legend text (e.g. with its cost); ``ideal``: objective -> f* or None.
    ``axis_label``: key -> axis title, for axes that are not held-out losses (e.g. benchmark scores).
    """
    ideal = ideal or {}
    pairs = list(itertools.combinations(names, 2))
    fig, axes = _figure(len(pairs))
    for ax, (a, b) in zip(axes, pairs):
        start_drawn = False
        for i, (method, evals) in enumerate(trajectories.items()):
            pts = [(e[a], e[b]) for e in evals if a in e and b in e]
            if not pts:
                continue
            xs, ys = zip(*pts)
            color = method_color(method, i)
            for start, end in zip(pts, pts[1:]):  # one arrow per evaluation interval: the direction of training
                ax.annotate("", xy=end, xytext=start, zorder=3,
                            arrowprops=dict(arrowstyle="-|>", color=color, lw=1.6, alpha=0.85,
                                            mutation_scale=11, shrinkA=0, shrinkB=2))
            ax.scatter(xs[1:-1], ys[1:-1], s=10, color=color, zorder=3)
            for step, text in (marks or {}).get(method, []):
                at = [(e[a], e[b]) for e in evals if e.get("step") == step and a in e and b in e]
                if at:
                    ax.annotate(text, at[0], textcoords="offset points", xytext=(8, 8), fontsize=8, color=color,
                                arrowprops=dict(arrowstyle="-", color=color, lw=0.8))
            ax.scatter([xs[-1]], [ys[-1]], s=110, color=color, edgecolor="black", zorder=5,
                       label=(labels or {}).get(method, method))
            if not start_drawn and len(pts) > 1:  # a single evaluation has no path to start
                ax.scatter([xs[0]], [ys[0]], s=90, facecolor="white", edgecolor="black", zorder=5,
                           label="start")
                start_drawn = True
        _mark_ideal(ax, ideal, a, b)
        ax.margins(0.07)  # room for the point labels at the edges
        ax.set_xlabel(axis_label(a) if axis_label else f"held-out {a} loss  (f_{names.index(a) + 1})")
        ax.set_ylabel(axis_label(b) if axis_label else f"held-out {b} loss  (f_{names.index(b) + 1})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8.5, loc="best", framealpha=0.9)
    return _finish(fig, axes, len(pairs), title, path)


def plot_fronts(fronts: Mapping[str, Sequence[tuple[float, Mapping[str, float]]]], names: Sequence[str],
                path: str | Path, ideal: Mapping[str, float | None] | None = None,
                title: str = "", axis_label: Callable[[str], str] | None = None) -> Path:
    """Each method's final held-out losses for every lambda, joined in lambda order (its trade-off
    front); every point is annotated with its lambda (the weight of the first objective).

    ``fronts``: method -> [(lambda, {objective: final loss}), ...]; ``axis_label`` as in
    :func:`plot_trajectories`.
    """
    ideal = ideal or {}
    pairs = list(itertools.combinations(names, 2))
    fig, axes = _figure(len(pairs))
    for ax, (a, b) in zip(axes, pairs):
        for i, (method, points) in enumerate(fronts.items()):
            pts = sorted((lam, f[a], f[b]) for lam, f in points if a in f and b in f)
            if not pts:
                continue
            lams, xs, ys = zip(*pts)
            color = method_color(method, i)
            ax.plot(xs, ys, "-o", color=color, lw=1.8, ms=6, markeredgecolor="black", label=method, zorder=4)
            for lam, x, y in pts:
                ax.annotate(f"{lam:g}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7.5,
                            color=color)
        _mark_ideal(ax, ideal, a, b)
        ax.margins(0.07)  # room for the point labels at the edges
        ax.set_xlabel(axis_label(a) if axis_label else f"final held-out {a} loss  (f_{names.index(a) + 1})")
        ax.set_ylabel(axis_label(b) if axis_label else f"final held-out {b} loss  (f_{names.index(b) + 1})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8.5, loc="best", framealpha=0.9,
                  title=f"labels: λ of {names[0]}", title_fontsize=8)
    return _finish(fig, axes, len(pairs), title, path)

"""Run several schedules on one config and one step budget, then plot and tabulate them.

``run_compare``: every method (default sequential, mix, alright, maxright) trains the same
objectives from the same model for the same number of optimizer steps, each in its own
``<out>/<method>/`` run directory; their held-out trajectories go into ``loss_space.png`` and
their final losses and costs into ``compare.md`` / ``compare.json``. With an ``eval`` section the
table also holds each method's benchmark scores and generation metrics (exact match, F1, win rate)
at its last evaluation, and ``measures.png`` plots a chosen pair of them per method (e.g. MMLU
against win rate: the papers' table, on the user's model and data).

``run_sweep``: the same for each lambda of a list (two objectives), giving each method's
trade-off front: ``sweep.png``, ``sweep.md``, ``sweep.json`` (and ``sweep_measures.png``).

The ideal point (f_1*, f_2*, ...) comes from ``objectives[i].optimum`` when the config gives it;
with ``ideal=True`` the missing ones are measured by training each objective alone for the same
budget (``<out>/ideal-<name>/``), f_i* being its best held-out loss.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

from bipost.config import RunConfig
from bipost.configio import ConfigError, validate
from bipost.report.loss_space import plot_fronts, plot_trajectories
from bipost.report.tables import comparison_rows, markdown, measure_keys, measure_label, write_json

METHODS = ("sequential", "mix", "alright", "maxright")
"""The bi-objective schedules compared by default, in plotting order."""


@dataclass
class MethodResult:
    """What one method's run produced (from :class:`bipost.train.loop.RunResult`)."""

    method: str
    output_dir: Path
    steps: int
    wall_time: float
    tokens: int
    ran: dict[str, int]
    """Optimizer steps in which each objective took part."""
    eval_history: list[dict] = field(default_factory=list)
    """Held-out loss of every objective at every evaluation (``{"step", name: loss}``)."""
    stopped_early: str | None = None
    lam: float | None = None
    """Weight of the first objective (sweeps)."""

    @property
    def final(self) -> dict[str, float]:
        """Held-out losses at the last evaluation."""
        last = self.eval_history[-1] if self.eval_history else {}
        return {k: v for k, v in last.items() if k != "step"}

    def best(self, name: str) -> float | None:
        values = [e[name] for e in self.eval_history if name in e]
        return min(values) if values else None

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "lambda": self.lam, "output_dir": str(self.output_dir), "steps": self.steps,
                "wall_time_s": self.wall_time, "tokens": self.tokens, "ran": self.ran,
                "stopped_early": self.stopped_early, "trajectory": self.eval_history}


def is_main() -> bool:
    # Every launcher exports RANK; reading it sets up nothing (the engine owns the process group).
    return int(os.environ.get("RANK", "0")) == 0


def _say(msg: str) -> None:
    if is_main():
        print(msg, flush=True)


def check_comparable(cfg: RunConfig) -> None:
    """A comparison needs two or more objectives, each with held-out data to draw its trajectory."""
    if len(cfg.objectives) < 2:
        raise ConfigError(f"compare/sweep need two or more objectives; the config has {len(cfg.objectives)}")
    for i, o in enumerate(cfg.objectives):
        if not o.data.eval_split and not o.data.eval_fraction:
            raise ConfigError(
                f"compare/sweep plot held-out losses: objective {o.name} has no eval data; set "
                f"objectives.{i}.data.eval_fraction (e.g. 0.05) or objectives.{i}.data.eval_split")


def resolve_budget(cfg: RunConfig) -> int:
    """The shared step budget (``train.max_steps``, else the loop's epochs rule on the loaded data),
    fixed before any method runs so every method and every lambda gets exactly the same."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    from bipost.data import load_objective_data
    from bipost.kinds import get_kind
    from bipost.models import load_tokenizer
    from bipost.train.build import step_budget

    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, cfg.model.trust_remote_code)
    runs = {o.name: SimpleNamespace(cfg=o, train=load_objective_data(o.data, get_kind(o.kind).examples_for(o),
                                                                     tokenizer).train)
            for o in cfg.objectives}
    return step_budget(cfg, runs)  # type: ignore[arg-type]


def _prepared(cfg: RunConfig, budget: int) -> RunConfig:
    cfg = copy.deepcopy(cfg)
    cfg.train.max_steps = budget
    if not cfg.train.eval_steps:
        cfg.train.eval_steps = max(1, budget // 10)
    # A requeued compare / sweep (preempted: SIGTERM saves a checkpoint) continues every method's run
    # where it stopped; a finished method's run resumes from its last checkpoint and redoes the rest,
    # reaching the same result (runs are deterministic). The histories come from metrics.jsonl.
    cfg.train.resume = "auto"
    return cfg


def run_method(cfg: RunConfig, method: str, out: Path, lam: float | None = None) -> MethodResult:
    """Train ``cfg`` with schedule ``method`` into ``out`` (through the one loop)."""
    from bipost.run import train

    cfg = copy.deepcopy(cfg)
    cfg.schedule.name = method
    cfg.train.output_dir = str(out)
    validate(cfg)
    result = train(cfg)
    steps, ran, history = _history(Path(result.output_dir) / "metrics.jsonl", [o.name for o in cfg.objectives])
    return MethodResult(method, Path(result.output_dir), steps, result.wall_time, result.tokens,
                        ran, history, result.stopped_early, lam)


def _history(metrics: Path, names: list[str]) -> tuple[int, dict[str, int], list[dict]]:
    """A run's whole history from its metrics.jsonl (also the steps before a resume): the steps run,
    the steps each objective took part in, and every evaluation as ``{"step", name: loss, measure: value}``."""
    from bipost.train.metrics import read_metrics

    ran: dict[str, int] = {n: 0 for n in names}
    steps, history = 0, []
    for rec in read_metrics(metrics):
        if rec.get("kind", "train") == "train":
            steps += 1
            for n in rec["ran"]:
                ran[n] = ran.get(n, 0) + 1
        elif rec.get("kind") == "eval":
            history.append({"step": rec["step"], **{(k[5:] if k.startswith("eval/") else k): v
                                                    for k, v in rec.items() if k not in ("kind", "step")}})
    return steps, ran, history


def ideal_point(cfg: RunConfig, out: Path, measure: bool,
                tag: str = "compare") -> tuple[dict[str, float | None], list[MethodResult]]:
    """f_i* per objective: the configured optimum, else (``measure``) the best held-out loss of a
    run of that objective alone on the same budget, else None."""
    ideal: dict[str, float | None] = {o.name: o.optimum for o in cfg.objectives}
    runs = []
    for o in cfg.objectives:
        if ideal[o.name] is not None or not measure:
            continue
        single = copy.deepcopy(cfg)
        single.objectives = [copy.deepcopy(o)]
        single.objectives[0].weight = 1.0
        single.schedule.name = "single"
        if single.eval.objectives:  # generation metrics only of the objectives the config names
            single.eval.generate = single.eval.generate and o.name in single.eval.objectives
            single.eval.objectives = [n for n in single.eval.objectives if n == o.name]
        _say(f"[{tag}] ideal point: training {o.name} alone -> {out / f'ideal-{o.name}'}")
        r = run_method(single, "single", out / f"ideal-{o.name}")
        r.method = f"{o.name} alone"
        ideal[o.name] = r.best(o.name)
        runs.append(r)
    return ideal, runs


def _methods(methods: Sequence[str] | None) -> list[str]:
    from bipost.schedules import SCHEDULES

    chosen = list(methods or METHODS)
    bad = [m for m in chosen if m not in SCHEDULES or m == "single"]
    if bad:
        raise ConfigError(f"unknown method(s) {bad}; choose from {sorted(set(SCHEDULES) - {'single'})}")
    return chosen


def _lambdas_text(cfg: RunConfig) -> str:
    return ", ".join(f"{o.name} {o.weight:.2g}" for o in cfg.objectives)


def check_measures(measures: Sequence[str] | None) -> list[str] | None:
    """A pair of measures to plot (``bench/<task>/<metric>``, ``gen/<objective>/<metric>``), checked
    before anything trains."""
    if not measures:
        return None
    if len(measures) != 2:
        raise ConfigError(f"--measures takes two measures, e.g. bench/mmlu/acc,gen/dpo/win_rate; got {list(measures)}")
    return list(measures)


def default_pair(measures: Sequence[str]) -> list[str] | None:
    """Two measures of different things: the first measure (a benchmark when there is one), against
    a win rate of another objective when there is one, else the first measure of another benchmark or
    objective (e.g. MMLU against DPO's win rate; SFT's exact match against DPO's)."""
    if len(measures) < 2:
        return None
    first = measures[0]
    other = [m for m in measures if m.split("/")[1] != first.split("/")[1]]
    wins = [m for m in other if m.endswith("/win_rate")]
    return [first, (wins or other or list(measures[1:]))[0]]


def measure_pair(results: Sequence[MethodResult], chosen: Sequence[str] | None) -> list[str] | None:
    """The two measures to plot: ``chosen`` when every one was measured (else None, with a
    warning), otherwise :func:`default_pair` of what the runs measured."""
    finals = [r.final for r in results]
    available = measure_keys(finals)
    if not chosen:
        return default_pair(available)
    missing = [m for m in chosen if not any(m in f for f in finals)]
    if missing:
        _say(f"[compare] no plot of {', '.join(chosen)}: {', '.join(missing)} was not measured "
             f"(measured: {', '.join(available) or 'none; set eval.benchmarks or eval.generate'})")
        return None
    return list(chosen)


def _measures_title(pair: Sequence[str], budget: int) -> str:
    return (f"{measure_label(pair[0])} vs {measure_label(pair[1])}\n"
            f"at the evaluations that measured both, over {budget} steps; the large point is the last")


@dataclass
class Comparison:
    names: list[str]
    budget: int
    results: list[MethodResult]
    ideal: dict[str, float | None]
    ideal_runs: list[MethodResult]
    plot: Path
    table_md: Path
    table_json: Path
    rows: list[dict]
    measures_plot: Path | None = None
    """``measures.png``: each method in the plane of two measures (None without two measures)."""


def run_compare(cfg: RunConfig, out: str | Path, methods: Sequence[str] | None = None,
                ideal: bool = False, measures: Sequence[str] | None = None) -> Comparison:
    """Train every method on ``cfg`` with one budget; write ``loss_space.png``, ``compare.md`` and
    ``compare.json`` into ``out``, and ``measures.png`` (``measures``: the pair to plot; default
    :func:`default_pair`)."""
    check_comparable(cfg)
    measures = check_measures(measures)
    chosen = _methods(methods)
    out = Path(out)
    budget = resolve_budget(cfg)
    base = _prepared(cfg, budget)
    names = [o.name for o in base.objectives]
    _say(f"[compare] {len(chosen)} methods x {budget} steps, lambda: {_lambdas_text(base)}; "
         f"held-out losses every {base.train.eval_steps} steps")
    results = []
    for i, m in enumerate(chosen, 1):
        _say(f"[compare] {i}/{len(chosen)}: {m} -> {out / m}")
        results.append(run_method(base, m, out / m))
    f_star, ideal_runs = ideal_point(base, out, ideal)
    rows = comparison_rows(results, names, f_star)
    plot = out / "loss_space.png"
    table_md, table_json = out / "compare.md", out / "compare.json"
    pair = measure_pair(results, measures)
    measures_plot = out / "measures.png" if pair else None
    if is_main():
        labels = {r["method"]: _legend(r) for r in rows}
        title = (f"Loss space: {' + '.join(names)} (λ: {_lambdas_text(base)})\n"
                 f"held-out losses every {base.train.eval_steps} of {budget} steps; arrows point the way training went")
        plot_trajectories({r.method: r.eval_history for r in results}, names, plot, f_star, labels, title,
                          marks={"sequential": _stage_marks(base, budget)}, axis_label=_axis_label(base))
        if pair and measures_plot:
            plot_trajectories({r.method: r.eval_history for r in results}, pair, measures_plot, labels=labels,
                              title=_measures_title(pair, budget), axis_label=measure_label)
        table_md.write_text(_header(_lambdas_text(base), budget, f_star, ideal) + "\n"
                            + markdown(rows, names, measured_as(base)))
        write_json(table_json, {"objectives": names, "weights": {o.name: o.weight for o in base.objectives},
                                "budget_steps": budget, "ideal": f_star,
                                "measures": measure_keys([r.final for r in results]), "measures_plotted": pair,
                                "rows": rows, "runs": [r.to_json() for r in results],
                                "ideal_runs": [r.to_json() for r in ideal_runs]})
    return Comparison(names, budget, results, f_star, ideal_runs, plot, table_md, table_json, rows, measures_plot)


def measured_as(cfg: RunConfig) -> dict[str, str]:
    """Objective -> what its held-out value is: ``loss``, or e.g. ``-reward`` for an online objective
    (``Objective.measure_name``: lower is better for every kind)."""
    from bipost.kinds import get_kind

    return {o.name: get_kind(o.kind).measure_name for o in cfg.objectives}  # type: ignore[misc]


def _axis_label(cfg: RunConfig, prefix: str = ""):
    names, measured = [o.name for o in cfg.objectives], measured_as(cfg)
    return lambda n: f"{prefix}held-out {n} {measured[n]}  (f_{names.index(n) + 1})"


def _stage_marks(cfg: RunConfig, budget: int) -> list[tuple[int, str]]:
    """Where the sequential schedule switches objective (its stage boundaries), for the plot."""
    from bipost.schedules.simple import Sequential

    ends = Sequential(cfg.objectives, cfg.schedule, budget).boundaries()
    return [(end, f"sequential: {cfg.objectives[i].name} → {cfg.objectives[i + 1].name}")
            for i, end in enumerate(ends[:-1])]


def _legend(row: dict) -> str:
    cost = row.get("time_vs_sequential")
    return row["method"] + (f"  ({cost:.2f}× seq. time)" if cost is not None else "")


def _header(lambdas: str, budget: int, ideal: dict, measured: bool) -> str:
    src = ("config optimum" if not measured else "config optimum, else best held-out loss of the objective "
           "trained alone on the same budget")
    known = ", ".join(f"{n} {v:.4f}" for n, v in ideal.items() if v is not None) or "unknown"
    return (f"Budget: {budget} optimizer steps per method. λ: {lambdas}. "
            f"Ideal point ({src}): {known}.\n"
            f"Final losses are held-out losses at the last evaluation; wall time counts training steps only.\n")


@dataclass
class Sweep:
    names: list[str]
    budget: int
    lambdas: list[float]
    results: list[MethodResult]
    ideal: dict[str, float | None]
    plot: Path
    table_md: Path
    table_json: Path
    rows: list[dict]
    measures_plot: Path | None = None
    """``sweep_measures.png``: each method's front in the plane of two measures."""


def run_sweep(cfg: RunConfig, lambdas: Sequence[float], out: str | Path, methods: Sequence[str] | None = None,
              ideal: bool = False, measures: Sequence[str] | None = None) -> Sweep:
    """For each lambda (weight of the first objective; the second gets 1 - lambda) train every
    method; plot each method's front of final losses (and of two measures) and tabulate them."""
    check_comparable(cfg)
    measures = check_measures(measures)
    if len(cfg.objectives) != 2:
        raise ConfigError(f"sweep traces two-objective fronts; the config has {len(cfg.objectives)} objectives")
    bad = [x for x in lambdas if not 0.0 <= x <= 1.0]
    if bad or not lambdas:
        raise ConfigError(f"--lambdas must be numbers in [0, 1], got {list(lambdas)}")
    chosen = _methods(methods)
    out = Path(out)
    budget = resolve_budget(cfg)
    base = _prepared(cfg, budget)
    names = [o.name for o in base.objectives]
    total = len(lambdas) * len(chosen)
    results: list[MethodResult] = []
    t0 = time.time()
    for lam in lambdas:
        run_cfg = copy.deepcopy(base)
        run_cfg.objectives[0].weight, run_cfg.objectives[1].weight = lam, 1.0 - lam
        for m in chosen:
            _say(f"[sweep] {len(results) + 1}/{total}: λ={lam:g} {m} -> {out / f'lambda-{lam:g}' / m}")
            results.append(run_method(run_cfg, m, out / f"lambda-{lam:g}" / m, lam=lam))
    f_star, _ = ideal_point(base, out, ideal, tag="sweep")
    rows: list[dict] = []
    for lam in lambdas:
        rows += comparison_rows([r for r in results if r.lam == lam], names, f_star)
    plot, table_md, table_json = out / "sweep.png", out / "sweep.md", out / "sweep.json"
    pair = measure_pair(results, measures)
    measures_plot = out / "sweep_measures.png" if pair else None
    if is_main():
        fronts: dict[str, list] = {m: [(r.lam, r.final) for r in results if r.method == m] for m in chosen}
        plot_fronts(fronts, names, plot, f_star, axis_label=_axis_label(base, "final "),
                    title=f"Trade-off fronts: {' + '.join(names)}\nfinal held-out losses after {budget} steps, "
                          f"one point per λ")
        if pair and measures_plot:
            plot_fronts(fronts, pair, measures_plot, axis_label=measure_label,
                        title=f"{measure_label(pair[0])} vs {measure_label(pair[1])}\nat the last evaluation "
                              f"after {budget} steps, one point per λ")
        table_md.write_text(_header(f"{list(lambdas)} (weight of {names[0]})", budget, f_star, ideal)
                            + "\n" + markdown(rows, names, measured_as(base)))
        write_json(table_json, {"objectives": names, "budget_steps": budget, "lambdas": list(lambdas),
                                "ideal": f_star, "measures": measure_keys([r.final for r in results]),
                                "measures_plotted": pair, "rows": rows, "runs": [r.to_json() for r in results],
                                "wall_time_total_s": time.time() - t0})
    return Sweep(names, budget, list(lambdas), results, f_star, plot, table_md, table_json, rows, measures_plot)


def parse_lambdas(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.replace(" ", ",").split(",") if x]
    except ValueError:
        raise ConfigError(f"--lambdas takes comma-separated numbers, got {text!r}") from None
    if any(math.isnan(v) for v in values):
        raise ConfigError(f"--lambdas: not a number in {text!r}")
    return values

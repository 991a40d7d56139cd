"""``bipost compare CONFIG`` and ``bipost sweep CONFIG --lambdas ...``."""

from __future__ import annotations

import argparse
from pathlib import Path

COMPARE_EPILOG = """\
Every method trains the config's objectives from the same model for the same number of optimizer
steps (train.max_steps, else the epochs rule) in OUT/<method>/. Held-out losses of every objective
are measured every train.eval_steps (default: a tenth of the budget), so every objective needs
eval data (objectives.N.data.eval_fraction or eval_split). Writes OUT/loss_space.png,
OUT/compare.md and OUT/compare.json. The ideal point is objectives.N.optimum where given; --ideal
measures the others by training each objective alone on the same budget (OUT/ideal-<name>/).
With an eval section (eval.generate, eval.benchmarks) the table also holds each method's exact
match, F1, win rate and benchmark scores at its last evaluation, and OUT/measures.png plots two of
them per method (--measures; default: the first measure, e.g. a benchmark, against a win rate or
another objective's measure)."""

SWEEP_EPILOG = """\
For each lambda (the weight of the first objective; the second gets 1 - lambda) every method is
trained as in `bipost compare` (OUT/lambda-<lambda>/<method>/). Writes OUT/sweep.png (each
method's front of final held-out losses, points labelled by lambda), OUT/sweep.md, OUT/sweep.json,
and with an eval section OUT/sweep_measures.png (the fronts in the plane of two measures)."""


def _methods(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [m.strip().lower() for v in values for m in v.split(",") if m.strip()]


def _measures(value: str | None) -> list[str] | None:
    return [m.strip() for m in value.split(",") if m.strip()] if value else None


def _load(args):
    from bipost.configio import load_config

    # `--methods a b key=value`: nargs="+" swallowed the overrides that followed it.
    stray = [v for v in args.methods or [] if "=" in v]
    args.methods = [v for v in args.methods or [] if "=" not in v]
    # Each method sets schedule.name itself; the placeholder only lets a config that names no
    # schedule (the default, single, takes one objective) pass validation.
    cfg = load_config(args.config, ["schedule.name=alright", *args.overrides, *stray])
    out = Path(args.out) if args.out else Path(cfg.train.output_dir) / args.command
    return cfg, out


def run_compare(args) -> int:
    from bipost.report.compare import is_main, run_compare as compare

    cfg, out = _load(args)
    result = compare(cfg, out, _methods(args.methods), ideal=args.ideal, measures=_measures(args.measures))
    if is_main():
        print(result.table_md.read_text(), flush=True)
        print(f"[compare] loss-space plot: {result.plot}\n[compare] table: {result.table_md} and {result.table_json}",
              flush=True)
        if result.measures_plot:
            print(f"[compare] measures plot: {result.measures_plot}", flush=True)
    return 0


def run_sweep(args) -> int:
    from bipost.report.compare import is_main, parse_lambdas, run_sweep as sweep

    cfg, out = _load(args)
    result = sweep(cfg, parse_lambdas(args.lambdas), out, _methods(args.methods), ideal=args.ideal,
                   measures=_measures(args.measures))
    if is_main():
        print(result.table_md.read_text(), flush=True)
        print(f"[sweep] fronts: {result.plot}\n[sweep] table: {result.table_md} and {result.table_json}", flush=True)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config with two or more objectives")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--methods", nargs="+", metavar="METHOD",
                   help="schedules to run, comma- or space-separated (default: sequential mix alright maxright)")
    p.add_argument("--out", default=None, help="output folder (default: <train.output_dir>/<command>)")
    p.add_argument("--ideal", action="store_true",
                   help="measure the ideal point: train each objective alone on the same budget")
    p.add_argument("--measures", default=None, metavar="A,B",
                   help="two measures to plot per method, e.g. bench/mmlu/acc,gen/dpo/win_rate "
                        "(default: the first measure against a win rate or another objective's measure)")


def register(sub) -> None:
    c = sub.add_parser("compare", help="run sequential, mix, alright and maxright on one config; plot loss space",
                       description="Compare bi-objective schedules on one config and one step budget.",
                       epilog=COMPARE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(c)
    c.set_defaults(func=run_compare)
    s = sub.add_parser("sweep", help="trace each method's trade-off front over lambda",
                       description="Run every method for each lambda and plot their fronts.",
                       epilog=SWEEP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(s)
    s.add_argument("--lambdas", required=True, help="weights of the first objective, e.g. 0.1,0.25,0.5,0.75,0.9")
    s.set_defaults(func=run_sweep)

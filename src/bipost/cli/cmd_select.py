"""``bipost select train | filter | pipeline``: bilevel data selection, filtering, and both plus a retrain.

* ``bipost select train CONFIG [key=value ...]``: a run with ``selector.enabled=true`` (the schedule
  defaults to ``bilevel``); weights in ``<train.output_dir>/<selector.name>/``.
* ``bipost select filter --weights W [--data D] (--top-p P | --top-k K | --min-weight X) --out F``:
  the kept rows of the original data, unchanged (``bipost.selector.filter``).
* ``bipost select pipeline CONFIG [key=value ...] --top-p P``: select, filter the lower objective's
  data into ``<output_dir>/filtered/``, then train a follow-up run on it (the same config with the
  selector off and the filtered file as the lower objective's data) in ``<output_dir>/retrain/``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path


def _fail(msg: str) -> int:
    print(f"bipost select: error: {msg}", file=sys.stderr)
    return 2


def _add_criterion(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--top-p", type=float, help="keep this fraction of the weighted rows, highest weights first")
    g.add_argument("--top-k", type=int, help="keep this many rows, highest weights first")
    g.add_argument("--min-weight", type=float, help="keep the rows whose weight is at least this")
    p.add_argument("--keep-unweighted", action="store_true",
                   help="also keep rows the selector never weighted (eval hold-out, skipped, past max_samples)")


def _criterion(args) -> dict:
    return {"top_p": args.top_p, "top_k": args.top_k, "min_weight": args.min_weight}


def _select_config(args):
    """The config with the selector on; the schedule defaults to ``bilevel`` (the seeds' penalty
    method) unless the file or the overrides name one."""
    from bipost.configio import load_config, load_tree

    overrides = ["selector.enabled=true", *args.overrides]
    if "name" not in (load_tree(args.config, overrides).get("schedule") or {}):
        overrides.insert(0, "schedule.name=bilevel")
    return load_config(args.config, overrides)


def run_train(args) -> int:
    from bipost.run import train

    cfg = _select_config(args)
    result = train(cfg)
    print(f"[bipost] run directory: {result.output_dir}; weights and summary: "
          f"{result.output_dir / cfg.selector.name}")
    return 0


def run_filter(args) -> int:
    from bipost.selector.filter import filter_rows

    try:
        res = filter_rows(args.weights, args.data, args.out, split=args.split,
                          keep_unweighted=args.keep_unweighted, **_criterion(args))
    except (ValueError, FileNotFoundError) as e:  # DataError is a ValueError
        return _fail(str(e))
    print(f"[bipost] {res}")
    return 0


def follow_up_config(cfg, filtered: Path, out: Path, then: str, then_set: list[str]):
    """The retrain config: ``cfg`` with the selector off and the lower objective reading ``filtered``
    (every row of it: no ``max_samples``); ``then == "lower"`` keeps only that objective."""
    from bipost.config import RunConfig
    from bipost.configio import apply_override, from_dict, to_dict, validate

    nxt = copy.deepcopy(cfg)
    nxt.selector.enabled = False
    lower = next(o for o in nxt.objectives if o.name == cfg.selector.objective)
    lower.data.path = str(filtered)
    lower.data.max_samples = None
    if filtered.is_file():
        lower.data.split = "train"
    if then == "lower":
        nxt.objectives = [lower]
        nxt.schedule.name = "single"
        lower.weight = 1.0
    nxt.train.output_dir = str(out)
    tree = to_dict(nxt)
    for ov in then_set:
        apply_override(tree, ov)
    nxt = from_dict(RunConfig, tree)
    validate(nxt)
    return nxt


def run_pipeline(args) -> int:
    from bipost.selector.filter import filter_rows
    from bipost.selector.outputs import find_weights_file
    from bipost.run import train

    cfg = _select_config(args)
    run_dir = Path(cfg.train.output_dir)
    # Check the follow-up config before spending the selection run on it.
    follow_up_config(cfg, run_dir / "filtered" / "check.jsonl", run_dir / "retrain", args.then, args.then_set)
    selected = train(cfg)
    lower = next(o for o in cfg.objectives if o.name == cfg.selector.objective)
    src = Path(lower.data.path)
    dst = run_dir / "filtered" / (src.name if src.exists() else f"{lower.name}.jsonl")
    try:
        res = filter_rows(find_weights_file(run_dir / cfg.selector.name), lower.data.path, dst,
                          split=lower.data.split, keep_unweighted=args.keep_unweighted, **_criterion(args))
    except (ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    print(f"[bipost] filter: {res}")
    nxt = follow_up_config(cfg, res.out, run_dir / "retrain", args.then, args.then_set)
    retrained = train(nxt)
    print(f"[bipost] pipeline done: selection run {selected.output_dir}, filtered data {res.out}, "
          f"retrained model {retrained.final_dir}")
    return 0


def register(sub) -> None:
    from bipost.configio import describe

    s = sub.add_parser("select", help="bilevel data selection: learn row weights, filter the data, retrain",
                       description="Bilevel data selection (see docs/selector.md).")
    actions = s.add_subparsers(dest="select_command", metavar="ACTION")
    s.set_defaults(func=lambda args: (s.print_help(), 0)[1])

    t = actions.add_parser("train", help="train with the data selector on (weights per row of the lower objective)",
                           epilog="Fields (selector.*, schedule.lambda_decay, ...):\n\n" + "\n".join(describe()),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("config", nargs="?", help="YAML config (two objectives: trusted first, weighted second)")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    t.set_defaults(func=run_train)

    f = actions.add_parser("filter", help="write the kept rows of the original data, unchanged")
    f.add_argument("--weights", required=True, help="weights file (.parquet/.jsonl) or a folder holding one")
    f.add_argument("--data", default=None, help="the original data (default: the one the weights record)")
    f.add_argument("--split", default=None, help="split of --data (default: the recorded one, else train)")
    f.add_argument("--out", required=True, help="output file (same type as the input) or folder")
    _add_criterion(f)
    f.set_defaults(func=run_filter)

    p = actions.add_parser("pipeline", help="select, filter, then train on the filtered data (one command)")
    p.add_argument("config", nargs="?", help="YAML config of the selection run")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the selection run")
    _add_criterion(p)
    p.add_argument("--then", choices=["both", "lower"], default="both",
                   help="retrain on both objectives (filtered data as the lower one; default) or on the "
                        "filtered data alone")
    p.add_argument("--then-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override of the retrain run only (repeatable), e.g. --then-set schedule.name=alright")
    p.set_defaults(func=run_pipeline)

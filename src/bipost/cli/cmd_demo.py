"""``bipost demo``."""

from __future__ import annotations


def run(args) -> int:
    from bipost.demo import run_demo

    run_demo(args.out, quick=args.quick)
    return 0


def register(sub) -> None:
    d = sub.add_parser("demo", help="build a tiny model and data offline, then train end to end")
    d.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    d.add_argument("--quick", action="store_true", help="a shorter run (used by the tests)")
    d.set_defaults(func=run)

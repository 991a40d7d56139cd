"""``bipost train CONFIG [key=value ...]``."""

from __future__ import annotations

import argparse

EPILOG = """\
CONFIG is a YAML file; each override is key.sub=value (list items by index, e.g.
objectives.0.weight=0.3). Fields:

"""


def run(args) -> int:
    from bipost.configio import load_config
    from bipost.run import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    from bipost.cli.common import print_main

    print_main(f"[bipost] run directory: {result.output_dir}")
    return 0


def register(sub) -> None:
    from bipost.configio import describe

    t = sub.add_parser("train", help="train from a YAML config and key=value overrides",
                       description="Train a model on one or more objectives.",
                       epilog=EPILOG + "\n".join(describe()), formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("config", nargs="?", help="YAML config file (optional if overrides give everything)")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    t.set_defaults(func=run)

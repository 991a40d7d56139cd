"""``bipost`` command: train, demo (and the commands later issues add)."""

from __future__ import annotations

import argparse
import sys

from bipost.cli.common import finish_distributed, setup_process

TRAIN_EPILOG = """\
CONFIG is a YAML file; each override is key.sub=value (list items by index, e.g.
objectives.0.weight=0.3). Fields:

"""


def _config_help() -> str:
    from bipost.configio import describe

    return TRAIN_EPILOG + "\n".join(describe())


def cmd_train(args) -> int:
    from bipost.configio import load_config
    from bipost.train.loop import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    print(f"[bipost] run directory: {result.output_dir}")
    return 0


def cmd_demo(args) -> int:
    from bipost.demo import run_demo

    run_demo(args.out, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bipost",
        description="LLM post-training that does not forget: train SFT, DPO and KD objectives together.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    t = sub.add_parser("train", help="train from a YAML config and key=value overrides",
                       description="Train a model on one or more objectives.",
                       epilog=_config_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("config", nargs="?", help="YAML config file (optional if overrides give everything)")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    t.set_defaults(func=cmd_train)
    d = sub.add_parser("demo", help="build a tiny model and data offline, then train SFT and DPO end to end")
    d.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    d.add_argument("--quick", action="store_true", help="a shorter run (used by the tests)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    setup_process()
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None) and "=" in args.config:
        args.overrides.insert(0, args.config)  # `bipost train a=b` without a YAML file
        args.config = None
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    from bipost.configio import ConfigError
    from bipost.data import DataError

    try:
        code = args.func(args)
    except (ConfigError, DataError, FileExistsError) as e:
        print(f"bipost: error: {e}", file=sys.stderr)
        code = 2
    finish_distributed(code)
    return code


if __name__ == "__main__":
    sys.exit(main())

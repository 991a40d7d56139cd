"""``bipost`` command. Each sub-command lives in its own ``cmd_*.py`` module with ``register``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from bipost.cli.common import run_guarded, setup_process

COMMANDS = ["train", "eval", "demo", "compare", "select", "distill"]
"""Modules ``bipost.cli.cmd_<name>``; each registers one or more sub-commands."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bipost",
        description="LLM post-training that does not forget: train SFT, DPO and KD objectives together.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = f"bipost.cli.cmd_{name}"
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module).register(sub)
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
    return run_guarded("bipost", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())

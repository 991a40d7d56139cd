"""``bipost demo`` (SFT, DPO and a method comparison) and ``bipost demo grpo`` (GRPO next to SFT)."""

from __future__ import annotations


def run(args) -> int:
    if args.which == "grpo":
        from bipost.demo.grpo import run_grpo_demo

        run_grpo_demo(args.out or "demo_out/grpo", quick=args.quick)
        return 0
    from bipost.demo import run_demo

    run_demo(args.out or "demo_out", quick=args.quick)
    return 0


def register(sub) -> None:
    d = sub.add_parser("demo", help="build a tiny model and data offline, then train end to end")
    d.add_argument("which", nargs="?", choices=["sft-dpo", "grpo"], default="sft-dpo",
                   help="sft-dpo (default): SFT, DPO and a comparison of the methods; grpo: GRPO next to SFT")
    d.add_argument("--out", default=None, help="output folder (default: demo_out, or demo_out/grpo)")
    d.add_argument("--quick", action="store_true", help="a shorter run (used by the tests)")
    d.set_defaults(func=run)

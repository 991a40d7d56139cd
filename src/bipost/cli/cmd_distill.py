"""``bipost distill-topk CONFIG [key=value ...] --out FILE``: a teacher's top-k written into the data."""

from __future__ import annotations

import argparse

EPILOG = """\
The config's kd objective names the teacher (objectives.N.teacher), the data and its keys, and
max_len; the tokenizer is the policy's (model.path / model.tokenizer). Every row of its split is
written unchanged, plus teacher_topk_ids / teacher_topk_logps: the teacher's top-k token ids and
log-probs (temperature 1) at each position that predicts a response token. Then train without a
teacher on the written file:

  bipost distill-topk kd.yaml --out data/kd-top32.parquet --k 32
  bipost train kd.yaml objectives.0.data.path=data/kd-top32.parquet objectives.0.teacher_logprobs=data

Several ranks split the forwards (torchrun / accelerate launch -m bipost.cli.main distill-topk ...)."""


def run(args) -> int:
    from bipost.configio import load_config
    from bipost.distill import distill_topk

    cfg = load_config(args.config, args.overrides)
    result = distill_topk(cfg, args.out, objective=args.objective, k=args.k, split=args.split, block=args.block,
                          batch_size=args.batch_size)
    from bipost.cli.common import print_main

    print_main(f"[distill-topk] {result}")
    return 0


def register(sub) -> None:
    d = sub.add_parser("distill-topk", help="write a teacher's top-k log-probs into a copy of a kd objective's data",
                       description="Compute a kd objective's teacher top-k once and store it with the data.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("config", nargs="?", help="YAML config file (optional if overrides give everything)")
    d.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    d.add_argument("--out", required=True, help="output file: .jsonl or .parquet")
    d.add_argument("--objective", default=None, help="the kd objective's name (default: the config's only kd one)")
    d.add_argument("--k", type=int, default=None, help="tokens per position (default: the objective's kd_topk)")
    d.add_argument("--split", default=None, help="split to write (default: the objective's data.split)")
    d.add_argument("--block", type=int, default=4096, help="examples computed and written at a time (default 4096)")
    d.add_argument("--batch-size", type=int, default=None,
                   help="examples per teacher forward (default: train.eval_batch_size, else micro_batch_size)")
    d.set_defaults(func=run)

"""``python -m bipost.cli.train_selector``: the BiPOST seed's command line for bilevel data selection.

Runs under ``python -m``, ``torchrun -m``, ``accelerate launch -m`` and ``deepspeed --module``.
Every flag maps onto the typed config (``bipost select train`` takes the same run as YAML):

=============================  ==========================================================
seed flag                      config field
=============================  ==========================================================
--pretrain                     model.path
--lora_rank/alpha/dropout      model.lora.rank / alpha / dropout
--target_modules               model.lora.target_modules
--bf16 / --flash_attn          model.dtype=bfloat16 / model.attn_implementation
--gradient_checkpointing       model.gradient_checkpointing
--obj_1, --dataset_1, ...      objectives.0 (upper level, the trusted data): kind, data.path,
                               data.input_key/output_key, data.max_samples (--max_samples_1)
--obj_2, --dataset_2, ...      objectives.1 (lower level, the rows that get weights); keys
                               --input_key_2/--output_key_2 (default: the _1 keys)
--pref_*_key                   data.prompt_key/chosen_key/rejected_key of preference objectives
--ref_model, --dpo_*           a kind's reference/teacher and own flags (as train_bi_objective)
--lambd                        objectives.0.weight = lambda, objectives.1.weight = 1 - lambda
                               (u, the upper-level weight)
--upperlevel_weight_decay      schedule.lambda_decay (u drops by it every epoch; default 0.1
                               as BiPOST)
--selector_learning_rate       selector.lr            --selector_activation  selector.activation
--selector_name                selector.name (output folder under --save_path)
--train_batch_size / --micro_train_batch_size   train.batch_size / train.micro_batch_size
--learning_rate                optim.lr
--max_epochs                   train.epochs
--save_path                    train.output_dir
--save_steps/--eval_steps -1   0 (only at the end)
--load_checkpoint              train.resume=auto (really resumes, selector included; a fresh run if none)
--zero_stage                   dist.zero_stage
=============================  ==========================================================
"""

from __future__ import annotations

import argparse
import sys

from bipost.cli.common import print_main, run_guarded, setup_process
from bipost.kinds import kinds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bipost.cli.train_selector",
        description="Bilevel data selection (BiPOST): learn a weight per row of dataset_2 while training on "
                    "dataset_1 (upper level) and the weighted dataset_2 (lower level).",
    )
    m = p.add_argument_group("model")
    m.add_argument("--pretrain", required=True, help="model name or local directory")
    m.add_argument("--lora_rank", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    m.add_argument("--lora_alpha", type=float, default=16)
    m.add_argument("--lora_dropout", type=float, default=0.0)
    m.add_argument("--target_modules", nargs="+", default=["all-linear"])
    m.add_argument("--bf16", action="store_true", help="bfloat16 weights")
    m.add_argument("--flash_attn", action="store_true", help="flash_attention_2")
    m.add_argument("--gradient_checkpointing", action="store_true")
    d = p.add_argument_group("objectives and data")
    names = sorted(k.cli_name for k in kinds().values())
    d.add_argument("--obj_1", type=str.upper, choices=names, default="SFT",
                   help="upper-level objective on dataset_1")
    d.add_argument("--dataset_1", required=True)
    d.add_argument("--max_samples_1", type=int, default=None)
    d.add_argument("--obj_2", type=str.upper, choices=names, default="SFT",
                   help="lower-level objective on dataset_2 (its rows get weights)")
    d.add_argument("--dataset_2", required=True)
    d.add_argument("--max_samples_2", type=int, default=None)
    d.add_argument("--input_key", default="input")
    d.add_argument("--output_key", default="output")
    d.add_argument("--input_key_2", default=None, help="default: --input_key")
    d.add_argument("--output_key_2", default=None, help="default: --output_key")
    d.add_argument("--input_template", default="User: {}\nAssistant: ")
    d.add_argument("--pref_prompt_key", default="prompt")
    d.add_argument("--pref_chosen_key", default="chosen")
    d.add_argument("--pref_rejected_key", default="rejected")
    d.add_argument("--ref_model", default=None,
                   help="the reference or teacher of the objective that needs one (DPO default: the initial policy)")
    d.add_argument("--max_len", type=int, default=None, help="longest sequence in tokens (default 512)")
    s = p.add_argument_group("bilevel selection")
    s.add_argument("--lambd", type=float, default=0.5, help="initial upper-level weight u in [0, 1]")
    s.add_argument("--upperlevel_weight_decay", type=float, default=0.1, help="u drops by this every epoch")
    s.add_argument("--selector_learning_rate", type=float, default=1e-4)
    s.add_argument("--selector_activation", choices=["softmax", "sigmoid"], default="softmax")
    s.add_argument("--selector_name", default="selector", help="output folder under --save_path")
    for kind in kinds().values():
        kind.add_seed_args(p)
    t = p.add_argument_group("training")
    t.add_argument("--train_batch_size", type=int, default=16, help="rows per optimizer step, per objective")
    t.add_argument("--micro_train_batch_size", type=int, default=1)
    t.add_argument("--learning_rate", type=float, default=1e-5)
    t.add_argument("--max_epochs", type=float, default=1)
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--save_path", required=True, help="run directory")
    t.add_argument("--save_steps", type=int, default=-1, help="-1: only the final model")
    t.add_argument("--logging_steps", type=int, default=1)
    t.add_argument("--eval_steps", type=int, default=-1, help="-1: only at the end")
    t.add_argument("--load_checkpoint", action="store_true", help="resume from the latest complete checkpoint in --save_path (a fresh run if none)")
    t.add_argument("--zero_stage", type=int, default=0)
    t.add_argument("--use_wandb", nargs="?", const="1", default=None, help="log to wandb")
    t.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher (unused)")
    return p


def to_config(args: argparse.Namespace):
    """The seed flags as a validated ``RunConfig``."""
    from bipost.cli.train_bi_objective import SeedPick
    from bipost.config import RunConfig
    from bipost.configio import ConfigError, from_dict, validate
    from bipost.kinds import kind_of_cli_name

    if not 0.0 <= args.lambd <= 1.0:
        raise ConfigError(f"--lambd must be in [0, 1], got {args.lambd}")
    chosen = [kind_of_cli_name(args.obj_1), kind_of_cli_name(args.obj_2)]

    def objective(i: int) -> dict:
        cls = chosen[i - 1]
        kind = cls.kind
        data = {
            "path": getattr(args, f"dataset_{i}"),
            "max_samples": getattr(args, f"max_samples_{i}"),
            "input_key": (args.input_key if i == 1 else args.input_key_2 or args.input_key),
            "output_key": (args.output_key if i == 1 else args.output_key_2 or args.output_key),
            "input_template": args.input_template,
            "prompt_key": args.pref_prompt_key,
            "chosen_key": args.pref_chosen_key,
            "rejected_key": args.pref_rejected_key,
        }
        if args.max_len is not None:
            data["max_len"] = args.max_len
        obj = {"kind": kind, "data": data, "weight": args.lambd if i == 1 else 1.0 - args.lambd}
        obj.update(cls.seed_fields(args, SeedPick(args, i, chosen[0] is chosen[1], cls.cli_name)))
        if cls.seed_model and args.ref_model:
            obj[cls.seed_model] = args.ref_model
        return obj

    tree = {
        "model": {
            "path": args.pretrain,
            "dtype": "bfloat16" if args.bf16 else "float32",  # as train_bi_objective and the seeds
            "attn_implementation": "flash_attention_2" if args.flash_attn else "auto",
            "gradient_checkpointing": args.gradient_checkpointing,
            "lora": {"rank": args.lora_rank, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                     "target_modules": list(args.target_modules)},
        },
        "objectives": [objective(1), objective(2)],
        "schedule": {"name": "bilevel", "lambda_decay": args.upperlevel_weight_decay},
        "optim": {"lr": args.learning_rate},
        "train": {
            "output_dir": args.save_path,
            "epochs": args.max_epochs,
            "batch_size": args.train_batch_size,
            "micro_batch_size": args.micro_train_batch_size,
            "seed": args.seed,
            "save_steps": max(0, args.save_steps),
            "eval_steps": max(0, args.eval_steps),
            "logging_steps": max(1, args.logging_steps),
            "resume": "auto" if args.load_checkpoint else "false",
            "report_to": ["wandb"] if args.use_wandb else [],
        },
        "dist": {"zero_stage": args.zero_stage},
        "selector": {"enabled": True, "lr": args.selector_learning_rate,
                     "activation": args.selector_activation, "name": args.selector_name},
    }
    cfg = from_dict(RunConfig, tree)
    validate(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    setup_process()
    args = build_parser().parse_args(argv)
    def run() -> int:
        cfg = to_config(args)
        from bipost.run import train

        result = train(cfg)
        print_main(f"[train_selector] run directory: {result.output_dir}; weights: "
                   f"{result.output_dir / cfg.selector.name}")
        return 0

    return run_guarded("train_selector", run)


if __name__ == "__main__":
    sys.exit(main())

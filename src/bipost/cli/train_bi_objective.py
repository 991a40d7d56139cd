"""``python -m bipost.cli.train_bi_objective``: the BiPOST / ALRIGHT command line, on bipost's one loop.

Every flag is mapped onto a :class:`bipost.config.RunConfig` *dict* which then goes through
``configio.from_dict`` + ``validate`` (the checks ``bipost train`` applies), and the run is the
same :class:`bipost.train.loop.Trainer` every other entry point uses. ``config_from_argv`` is the
mapping alone (the tests compare it with the equivalent YAML).

Which flag reaches which objective follows the seed exactly:

* ``--input_key/--output_key`` belong to the SFT/KD objective; ``--input_key_2/--output_key_2``
  to objective 2 only when *both* objectives are SFT/KD.
* ``--pref_*_key`` belong to the objective that reads preference data (DPO, SimPO, ORPO, KTO), their
  ``_2`` forms to objective 2 only when both do; a kind's own flags (``--dpo_*``, ``--simpo_*``,
  ``--orpo_*``, ``--kto_*``) likewise, their ``_2`` forms when both objectives are of that kind.
* ``--ref_model`` is the DPO/KTO reference or the KD teacher of whichever objective needs one;
  ``--ref_model_2`` is objective 2's only when both need one. A DPO objective without a model uses
  the policy's initial weights (the seed used ``--pretrain``; with LoRA: the adapter disabled).

A ``_2`` flag given where the seed would silently ignore it is an error here, and so are flags
bipost does not implement (they are listed in ``UNSUPPORTED``) and contradictions such as KD
without a teacher or IPO with label smoothing: exit code 2 and a message naming the flag.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, NoReturn, Sequence

from bipost.config import RunConfig
from bipost.configio import ConfigError, apply_override, from_dict, validate
from bipost.kinds import get_kind, kind_of_cli_name, kinds

log = logging.getLogger("bipost")

PROG = "python -m bipost.cli.train_bi_objective"

DESCRIPTION = """\
Train two objectives (SFT, DPO, SimPO, ORPO, KTO or KD, any pair) in one run with one schedule: the BiPOST /
ALRIGHT / MAXRIGHT command line on bipost's training loop. Runs as is, or under
`deepspeed --module`, `torchrun -m` and `accelerate launch -m`."""

EPILOG = """\
lambda convention: --lambd is the weight (mix), draw probability (alright), gap weight (maxright)
or step share (sequential) of --obj_1; --obj_2 gets 1 - lambd. This is BiPOST's convention. The
ALRIGHT/MAXRIGHT original (SFT + DPO only) used lambda = weight of DPO: its `--lambd 0.25` with
SFT first and DPO second is `--obj_1 SFT --obj_2 DPO --lambd 0.75` here.

Differences from the seeds, on purpose: -1 for --save_steps/--eval_steps means off (the final
model is always saved; held-out losses are always measured at the end); without --eval_split_N,
3% of objective N's rows are held out for evaluation and never trained on (the seeds fell back
to the first 3% of the *training* rows); --load_checkpoint resumes from the latest complete
checkpoint in SAVE_PATH/checkpoints; preference prompts are used verbatim (--input_template
applies to SFT/KD prompts only). Any other bipost setting: --set key.sub=value (see
`bipost train --help`), e.g. --set train.max_steps=100."""

SCHEDULES = ("alright", "maxright", "mix", "sequential")
EVAL_FRACTION = 0.03
"""Held-out share of each objective's rows when no --eval_split_N is given (the seeds' 3%)."""

UNSUPPORTED = {
    "load_in_4bit": "4-bit loading is not supported; use LoRA on a bf16 model (--bf16 --lora_rank N)",
    "disable_fast_tokenizer": "the tokenizer is always loaded with AutoTokenizer (fast where available)",
    "gradient_checkpointing_use_reentrant": "bipost uses non-reentrant gradient checkpointing",
    "grad_accum_dtype": "DeepSpeed's gradient-accumulation dtype is not configurable here",
    "disable_trace_cache": "DeepSpeed's trace cache is not configurable here",
    "ckpt_path": "checkpoints are written to SAVE_PATH/checkpoints",
    "max_ckpt_mem": "use --max_ckpt_num to bound the checkpoints kept",
    "tokenizer_chat_template_1": "set the chat template in the tokenizer's files instead",
    "tokenizer_chat_template_2": "set the chat template in the tokenizer's files instead",
    "aux_loss_coef_1": "the MoE auxiliary loss is not supported",
    "aux_loss_coef_2": "the MoE auxiliary loss is not supported",
}
"""Seed flags that parse but that bipost does not implement: passing one is an error saying why."""


class SeedArgError(ConfigError):
    """A seed command line that cannot run (the message names the flag)."""


# ---------------------------------------------------------------------------------- parser

def _objective_kind(value: str) -> str:
    try:
        return kind_of_cli_name(value).kind
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _needs_model(kind: str) -> bool:
    return get_kind(kind).seed_model is not None


def _is_pref(kind: str) -> bool:
    """The kind reads preference data (DPO, SimPO, ORPO; KTO splits each pair into two rows): the
    ``--pref_*_key`` flags are its."""
    return "preference" in get_kind(kind).examples.formats


def _number_or_none(value: str) -> int:
    return int(float(value))  # the seeds' defaults were 1e8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)

    g = p.add_argument_group("model")
    g.add_argument("--pretrain", required=True, help="policy: hub name or local directory (model.path)")
    g.add_argument("--lora_rank", type=int, default=0, help="LoRA rank; 0 = full fine-tuning (default 0)")
    g.add_argument("--lora_alpha", type=float, default=16, help="LoRA alpha (default 16)")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    g.add_argument("--target_modules", nargs="*", default=["all-linear"],
                   help="modules LoRA adapts, e.g. q_proj v_proj (default all-linear)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 weights (model.dtype); without it: float32")
    g.add_argument("--flash_attn", action="store_true",
                   help="FlashAttention-2 (needs the flash_attn package; without it sdpa is used, with a warning)")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")

    g = p.add_argument_group("schedule and objectives")
    g.add_argument("--schedule", choices=SCHEDULES, default="alright",
                   help="how the two objectives share the steps (default alright, as BiPOST)")
    g.add_argument("--lambd", type=float, default=0.5, help="lambda of obj_1 (obj_2 gets 1 - lambda); see below")
    g.add_argument("--max_eval_steps", type=int, default=10,
                   help="maxright: re-evaluate both objectives without gradients every N steps (default 10)")
    names = " | ".join(k.cli_name for k in kinds().values())
    for n in (1, 2):
        g.add_argument(f"--obj_{n}", type=_objective_kind, default="sft",
                       help=f"objective {n}: {names} (default SFT)")
        g.add_argument(f"--obj_opt_{n}", type=float, default=None,
                       help=f"f*_{n}, the optimal value of objective {n} (maxright gaps, --eps); "
                            f"unset: maxright estimates it online")
        g.add_argument(f"--ref_pareto_{n}", default="",
                       help=f"objective {n}'s coordinates of reference Pareto points, space-separated")
    g.add_argument("--eps", type=float, default=None,
                   help="early stop at an evaluation where every weighted gap lambda_i (f_i - f*_i) <= eps "
                        "(needs --obj_opt_1/2), or where the held-out losses are within eps of a reference "
                        "Pareto point")
    g.add_argument("--ref_model", default=None,
                   help="DPO/KTO reference or KD teacher of the objective that needs one "
                        "(DPO/KTO default: the policy's initial weights)")
    g.add_argument("--ref_model_2", default=None, help="obj_2's reference/teacher when both objectives need one")

    g = p.add_argument_group("data (objective N = 1, 2)")
    for n in (1, 2):
        g.add_argument(f"--dataset_{n}", default=None, help=f"objective {n}'s data: local file/folder or hub name")
        g.add_argument(f"--dataset_probs_{n}", default="1.0", help="only 1.0 (one dataset per objective)")
        g.add_argument(f"--train_split_{n}", default="train", help="training split (default train)")
        g.add_argument(f"--eval_split_{n}", default=None,
                       help=f"evaluation split (e.g. test); default: hold out {EVAL_FRACTION * 100:g}%% of the rows")
        g.add_argument(f"--max_samples_{n}", type=_number_or_none, default=None,
                       help="use at most the first N rows")
        g.add_argument(f"--max_len_{n}", type=int, default=None, help="max tokens per example (default --max_len)")
        g.add_argument(f"--input_template_{n}", default=None, help="SFT/KD prompt template (default --input_template)")
        g.add_argument(f"--apply_chat_template_{n}", action="store_true",
                       help="SFT/KD: the input/output columns hold conversations, rendered with the chat template")
    g.add_argument("--max_len", type=int, default=2048, help="max tokens per example, both objectives (default 2048)")
    g.add_argument("--input_template", default="User: {}\nAssistant: ", help="SFT/KD prompt template")
    g.add_argument("--input_key", default="input", help="prompt column of the SFT/KD data")
    g.add_argument("--output_key", default="output", help="response column of the SFT/KD data")
    g.add_argument("--input_key_2", default=None, help="obj_2's prompt column when both objectives are SFT/KD")
    g.add_argument("--output_key_2", default=None, help="obj_2's response column when both are SFT/KD")
    for key in ("prompt", "chosen", "rejected"):
        g.add_argument(f"--pref_{key}_key", default=key, help=f"{key} column of the preference data")
        g.add_argument(f"--pref_{key}_key_2", default=None, help=f"obj_2's {key} column when both are DPO")

    for kind in kinds().values():
        kind.add_seed_args(p)

    g = p.add_argument_group("optimization")
    g.add_argument("--train_batch_size", type=int, default=128, help="examples per optimizer step, all ranks")
    g.add_argument("--micro_train_batch_size", type=int, default=1, help="examples per forward per rank")
    g.add_argument("--learning_rate", type=float, default=1e-5)
    g.add_argument("--lr_scheduler", default="constant",
                   choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_min_lr"),
                   help="cosine_with_min_lr decays to 0.1 x lr, as OpenRLHF (default constant)")
    g.add_argument("--lr_warmup_ratio", type=float, default=0.0, help="warmup share of the steps")
    g.add_argument("--l2", type=float, default=0.0, help="weight decay")
    g.add_argument("--adam_betas", type=float, nargs=2, default=[0.9, 0.95])
    g.add_argument("--max_norm", type=float, default=1.0, help="gradient clipping (0 disables)")
    g.add_argument("--max_epochs", type=float, default=1,
                   help="passes over the larger objective's data; every schedule gets this step budget")
    g.add_argument("--seed", type=int, default=42, help="model/data seed and the schedule's draw seed")

    g = p.add_argument_group("saving, logging, evaluation")
    g.add_argument("--save_path", default="./ckpt", help="run directory (train.output_dir)")
    g.add_argument("--save_steps", type=int, default=-1, help="checkpoint every N steps (-1: off)")
    g.add_argument("--max_ckpt_num", type=int, default=3, help="checkpoints kept")
    g.add_argument("--load_checkpoint", action="store_true",
                   help="resume from the latest complete checkpoint in SAVE_PATH (a fresh run if none)")
    g.add_argument("--logging_steps", type=int, default=1)
    g.add_argument("--eval_steps", type=int, default=-1, help="held-out losses every N steps (-1: at the end only)")
    g.add_argument("--use_wandb", nargs="?", const="", default=None, metavar="WANDB_KEY",
                   help="log to wandb (the key, if given, is passed as WANDB_API_KEY)")
    g.add_argument("--wandb_project", default="bipost")
    g.add_argument("--wandb_org", default=None, help="wandb entity (WANDB_ENTITY)")
    g.add_argument("--wandb_group", default=None, help="wandb group (WANDB_RUN_GROUP)")
    g.add_argument("--wandb_run_name", default=None, help="wandb run name (WANDB_NAME)")
    g.add_argument("--use_tensorboard", default=None, metavar="DIR",
                   help="log to TensorBoard (event files go to SAVE_PATH/tensorboard)")

    g = p.add_argument_group("distribution (used by the engine under deepspeed/accelerate)")
    g.add_argument("--zero_stage", type=int, default=2,
                   help="DeepSpeed ZeRO stage (default 2, as the seeds); 0, or DeepSpeed not installed: no ZeRO")
    g.add_argument("--adam_offload", action="store_true", help="optimizer states on the CPU")
    g.add_argument("--ref_offload", action="store_true", help="reference/teacher weights on the CPU")
    g.add_argument("--ref_offload_2", action="store_true", help="same as --ref_offload")
    g.add_argument("--zpg", type=int, default=1, help="ZeRO++ hierarchical partition size")
    g.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by `deepspeed`

    g = p.add_argument_group("bipost")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any bipost config field, applied last (repeatable), e.g. --set train.max_steps=100")

    for name in UNSUPPORTED:
        p.add_argument(f"--{name}", nargs="?", const=True, default=None, help=argparse.SUPPRESS)
    return p


# ---------------------------------------------------------------------------------- mapping

def _fail(msg: str) -> NoReturn:
    raise SeedArgError(msg)


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise SeedArgError(f"{flag} takes space-separated numbers, got {text!r}") from None


def _pick(args, base: str, n: int, both: bool, default: Any, family: str) -> Any:
    """Objective ``n``'s value of a flag that has a ``_2`` form: objective 2 takes the ``_2`` flag
    when ``both`` objectives are of the ``family``, else everyone takes the shared flag. A
    ``_2`` flag the seed would have ignored is an error."""
    second = getattr(args, f"{base}_2")
    if n == 2 and both:
        return default if second is None else second
    if second is not None and not both:
        _fail(f"--{base}_2 applies only when both objectives are {family}; here the {family} objective uses --{base}")
    value = getattr(args, base)
    return default if value is None else value


def _data(args, n: int, kind: str, kinds: list[str]) -> dict:
    path = getattr(args, f"dataset_{n}")
    if not path:
        _fail(f"--dataset_{n} is required (objective {n}'s data: a local file/folder or a hub dataset)")
    probs = getattr(args, f"dataset_probs_{n}")
    if "," in path or _floats(probs, f"--dataset_probs_{n}") != [1.0]:
        _fail(f"--dataset_{n}/--dataset_probs_{n}: blending several datasets is not supported; "
              f"give one file, folder or hub dataset per objective")
    data: dict[str, Any] = {
        "path": path,
        "split": getattr(args, f"train_split_{n}"),
        "max_len": getattr(args, f"max_len_{n}") or args.max_len,
        "seed": args.seed,
    }
    if getattr(args, f"max_samples_{n}") is not None:
        data["max_samples"] = getattr(args, f"max_samples_{n}")
    eval_split = getattr(args, f"eval_split_{n}")
    if eval_split:
        data["eval_split"] = eval_split
    else:
        data["eval_fraction"] = EVAL_FRACTION
    if _is_pref(kind):
        both = all(_is_pref(k) for k in kinds)
        for key in ("prompt", "chosen", "rejected"):
            data[f"{key}_key"] = _pick(args, f"pref_{key}_key", n, both, key, "preference-data objectives")
        # A kind with other formats too (KTO: unpaired rows) takes whichever the data's keys show.
        data["format"] = "preference" if get_kind(kind).examples.formats == ("preference",) else "auto"
        if getattr(args, f"apply_chat_template_{n}"):
            log.info("--apply_chat_template_%d: preference conversations are always rendered with the "
                     "chat template", n)
    else:
        both = not any(_is_pref(k) for k in kinds)
        data["input_key"] = _pick(args, "input_key", n, both, "input", "SFT/KD")
        data["output_key"] = _pick(args, "output_key", n, both, "output", "SFT/KD")
        data["input_template"] = getattr(args, f"input_template_{n}") or args.input_template
        if getattr(args, f"apply_chat_template_{n}"):
            # Conversation columns: prompt = chat(input turns) + generation prompt, response = the rest.
            data["format"] = "prompt_completion"
            data["prompt_key"], data["completion_key"] = data.pop("input_key"), data.pop("output_key")
        else:
            data["format"] = "input_output"
    return data


def _objective(args, n: int, kinds: list[str]) -> dict:
    kind = kinds[n - 1]
    weight = args.lambd if n == 1 else 1.0 - args.lambd
    obj: dict[str, Any] = {"kind": kind, "weight": weight, "data": _data(args, n, kind, kinds)}
    if getattr(args, f"obj_opt_{n}") is not None:
        obj["optimum"] = getattr(args, f"obj_opt_{n}")
    cls = get_kind(kind)
    obj.update(cls.seed_fields(args, SeedPick(args, n, all(k == kind for k in kinds), cls.cli_name)))
    model = _frozen_model(args, n, kinds)
    if model:
        obj[cls.seed_model] = model
    elif cls.seed_model_required:
        flag = "--ref_model_2" if n == 2 and all(_needs_model(k) for k in kinds) else "--ref_model"
        _fail(f"--obj_{n} {cls.cli_name} needs a {cls.seed_model} model: pass {flag} "
              f"(a model sharing the policy's tokenizer)")
    return obj


class SeedPick:
    """A kind's flag values for objective ``n`` (``_pick``: its ``_2`` forms when both objectives are
    of that kind), and the flag each came from (for messages)."""

    def __init__(self, args, n: int, both: bool, family: str):
        self.args, self.n, self.both, self.family = args, n, both, family

    def __call__(self, base: str, default: Any) -> Any:
        return _pick(self.args, base, self.n, self.both, default, self.family)

    def flag(self, base: str) -> str:
        return f"--{base}_2" if self.n == 2 and self.both else f"--{base}"


def _frozen_model(args, n: int, kinds: list[str]) -> str | None:
    """The seed's rule: --ref_model for the objective that needs a model; --ref_model_2 for
    objective 2 when both do."""
    needs = [_needs_model(k) for k in kinds]
    if args.ref_model and not any(needs):
        from bipost.kinds import kinds as registered

        users = [k.cli_name for k in registered().values() if k.seed_model]
        names = ", ".join(users[:-1]) + f" or {users[-1]}" if len(users) > 1 else users[0]
        _fail(f"--ref_model is the reference or teacher of a {names} objective, but neither objective is {names}")
    if args.ref_model_2 and not all(needs):
        _fail("--ref_model_2 is used only when both objectives need a model (DPO/KD/KTO); "
              "use --ref_model for the one that does")
    if not needs[n - 1]:
        return None
    if n == 2 and all(needs):
        return args.ref_model_2
    return args.ref_model


def _check_unsupported(args) -> None:
    for name, why in UNSUPPORTED.items():
        value = getattr(args, name)
        if value is None or (name.startswith("aux_loss_coef") and _floats(str(value), f"--{name}") == [0.0]):
            continue
        _fail(f"--{name} is not supported: {why}")


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def _attn(flash: bool) -> str:
    if not flash:
        return "sdpa"
    if not _installed("flash_attn"):
        log.warning("--flash_attn: the flash_attn package is not installed; using sdpa attention")
        return "sdpa"
    return "flash_attention_2"


def _ref_pareto(args) -> list[list[float]]:
    p1, p2 = _floats(args.ref_pareto_1, "--ref_pareto_1"), _floats(args.ref_pareto_2, "--ref_pareto_2")
    if len(p1) != len(p2):
        _fail(f"--ref_pareto_1 and --ref_pareto_2 give {len(p1)} and {len(p2)} values; "
              f"they are the two coordinates of the same points")
    # The seeds stop when f_i <= p_i + eps for both objectives: loosen the points by eps.
    eps = args.eps or 0.0
    return [[a + eps, b + eps] for a, b in zip(p1, p2)]


SCHEDULER = {"constant": ("constant", 0.0), "constant_with_warmup": ("constant", 0.0), "linear": ("linear", 0.0),
             "cosine": ("cosine", 0.0), "cosine_with_min_lr": ("cosine", 0.1)}


def config_dict(args) -> dict:
    """The RunConfig dict a parsed seed command line stands for (before ``--set`` overrides)."""
    _check_unsupported(args)
    if not 0.0 <= args.lambd <= 1.0:
        _fail(f"--lambd is obj_1's weight and must be in [0, 1], got {args.lambd}")
    for flag in ("save_steps", "eval_steps"):
        if getattr(args, flag) < -1:
            _fail(f"--{flag} takes a positive step count or -1 (off), got {getattr(args, flag)}")
    kinds = [args.obj_1, args.obj_2]
    pareto = _ref_pareto(args)
    optima = [args.obj_opt_1, args.obj_opt_2]
    if args.eps is not None:
        if args.eps < 0:
            _fail(f"--eps must be >= 0, got {args.eps}")
        if not pareto and None in optima:
            _fail("--eps stops at f*: give both --obj_opt_1 and --obj_opt_2, or --ref_pareto_1/--ref_pareto_2")
        if any(o is not None for o in optima) and None in optima:
            _fail("--eps with --obj_opt_N needs both --obj_opt_1 and --obj_opt_2")
    scheduler, min_lr = SCHEDULER[args.lr_scheduler]
    report_to = (["wandb"] if args.use_wandb is not None else []) + (["tensorboard"] if args.use_tensorboard else [])
    return {
        "model": {
            "path": args.pretrain,
            "dtype": "bfloat16" if args.bf16 else "float32",
            "attn_implementation": _attn(args.flash_attn),
            "gradient_checkpointing": args.gradient_checkpointing,
            "lora": {"rank": args.lora_rank, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                     "target_modules": list(args.target_modules) or ["all-linear"]},
        },
        "objectives": [_objective(args, 1, kinds), _objective(args, 2, kinds)],
        "schedule": {"name": args.schedule, "seed": args.seed, "max_eval_steps": args.max_eval_steps},
        "optim": {"lr": args.learning_rate, "weight_decay": args.l2, "betas": list(args.adam_betas),
                  "max_grad_norm": args.max_norm, "scheduler": scheduler, "min_lr_ratio": min_lr,
                  "warmup_ratio": args.lr_warmup_ratio},
        "train": {
            "output_dir": args.save_path,
            "epochs": args.max_epochs,
            "batch_size": args.train_batch_size,
            "micro_batch_size": args.micro_train_batch_size,
            "seed": args.seed,
            "eval_steps": max(args.eval_steps, 0),
            "save_steps": max(args.save_steps, 0),
            "keep_last": args.max_ckpt_num,
            "resume": "auto" if args.load_checkpoint else "false",
            "logging_steps": args.logging_steps,
            "report_to": report_to,
            "wandb_project": args.wandb_project,
            "early_stop_eps": args.eps if args.eps is not None and None not in optima else None,
            "ref_pareto": pareto,
        },
        "dist": {"zero_stage": args.zero_stage, "offload_optimizer": args.adam_offload,
                 "offload_reference": args.ref_offload or args.ref_offload_2,
                 "zero_hpz_partition_size": args.zpg},
    }


def config_from_args(args) -> RunConfig:
    """Map, apply ``--set`` overrides, build and validate (``ConfigError`` on any problem)."""
    tree = config_dict(args)
    for assignment in args.set:
        apply_override(tree, assignment)
    cfg = from_dict(RunConfig, tree)
    validate(cfg)
    return cfg


def config_from_argv(argv: Sequence[str]) -> RunConfig:
    """The RunConfig a seed command line means (argparse errors exit with code 2)."""
    return config_from_args(build_parser().parse_args(list(argv)))


def _wandb_environment(args) -> None:
    """wandb reads these at ``wandb.init``; the seeds passed them as flags."""
    if args.use_wandb and args.use_wandb.lower() not in ("true", "1"):
        os.environ["WANDB_API_KEY"] = args.use_wandb
    for flag, var in (("wandb_org", "WANDB_ENTITY"), ("wandb_group", "WANDB_RUN_GROUP"),
                      ("wandb_run_name", "WANDB_NAME")):
        if getattr(args, flag):
            os.environ[var] = getattr(args, flag)


def main(argv: Sequence[str] | None = None) -> int:
    from bipost.cli.common import print_main, run_guarded, setup_process

    setup_process()
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # unknown flag or bad value: argparse has printed why
        return int(e.code or 0)
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    _wandb_environment(args)

    from bipost.run import train

    def run() -> int:
        result = train(cfg)
        print_main(f"[bipost] run directory: {result.output_dir}")
        return 0

    return run_guarded(PROG, run)


if __name__ == "__main__":
    sys.exit(main())

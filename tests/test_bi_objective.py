"""The seed-compatible ``train_bi_objective`` command line: mapping, errors, every objective pair."""

from __future__ import annotations

import math
import shlex

import pytest

from bipost.cli.train_bi_objective import config_from_argv, main
from bipost.configio import load_config
from bipost.train.metrics import read_metrics

from helpers import workspace


def seed_line(text: str) -> list[str]:
    """A seed script's argument block ({ws} = the tiny workspace), split as bash would."""
    return shlex.split(text.format(ws=workspace()))


# BiPOST's README example (KD + SFT), with a local tiny model and local data.
KD_SFT = """
   --pretrain {ws}/model --lora_alpha 16 --lora_rank 16 --target_module q_proj v_proj
   --train_batch_size 32 --micro_train_batch_size 1 --learning_rate 1e-5
   --obj_1 KD --dataset_1 {ws}/copy.jsonl --input_key input --output_key output --max_samples_1 6400
   --ref_model {ws}/teacher
   --obj_2 SFT --dataset_2 {ws}/sft.jsonl --input_key_2 input --output_key_2 output --max_samples_2 6400
   --save_path ./checkpoint/llama3-8b-kd-sft --max_epochs 2 --zero_stage 3 --save_steps -1
   --logging_steps 1 --eval_steps -1 --bf16 --flash_attn --load_checkpoint --gradient_checkpointing
   --local_rank=0
"""

KD_SFT_YAML = """
model:
  path: {ws}/model
  dtype: bfloat16
  attn_implementation: sdpa          # --flash_attn without the flash_attn package
  gradient_checkpointing: true
  lora: {{rank: 16, alpha: 16, target_modules: [q_proj, v_proj]}}
objectives:
  - kind: kd
    weight: 0.5
    teacher: {ws}/teacher
    data: {{path: {ws}/copy.jsonl, format: input_output, input_key: input, output_key: output,
           max_samples: 6400, max_len: 2048, eval_fraction: 0.03, seed: 42}}
  - kind: sft
    weight: 0.5
    data: {{path: {ws}/sft.jsonl, format: input_output, input_key: input, output_key: output,
           max_samples: 6400, max_len: 2048, eval_fraction: 0.03, seed: 42}}
schedule: {{name: alright, seed: 42}}
optim: {{lr: 1.0e-5}}
train:
  output_dir: ./checkpoint/llama3-8b-kd-sft
  epochs: 2
  batch_size: 32
  micro_batch_size: 1
  keep_last: 3                       # --max_ckpt_num's seed default
  resume: auto                       # --load_checkpoint: resume if there is a checkpoint
dist: {{zero_stage: {zero3}}}                # without DeepSpeed installed the engine runs DDP (a warning)
"""

# An ALRIGHT/MAXRIGHT-style line: DPO first (BiPOST's biobj_dpo_sft.sh keys), MAXRIGHT with known
# optima and a reference front, IPO, cosine LR.
DPO_SFT = """
   --pretrain {ws}/model --lambd 0.25 --train_batch_size 16 --micro_train_batch_size 2
   --learning_rate 5e-6 --lr_scheduler cosine_with_min_lr --lr_warmup_ratio 0.03
   --obj_1 DPO --dataset_1 {ws}/pref.jsonl --pref_prompt_key prompt --pref_chosen_key chosen
   --pref_rejected_key rejected --max_samples_1 1800 --dpo_beta 0.2 --dpo_ipo
   --obj_2 sft --dataset_2 {ws}/sft.jsonl --input_key input --output_key output --eval_split_2 test
   --max_len 1024 --max_len_2 512 --save_path out/dpo-sft --max_epochs 3 --save_steps 100 --eval_steps 20
   --schedule maxright --max_eval_steps 5 --obj_opt_1 0.05 --obj_opt_2 1.5 --eps 0.01
   --ref_pareto_1 "0.3 0.2" --ref_pareto_2 "1.7 1.9" --seed 7 --adam_offload --ref_offload --zpg 8
   --set train.keep_last=1
"""

DPO_SFT_YAML = """
model: {{path: {ws}/model, dtype: float32, attn_implementation: sdpa}}
objectives:
  - kind: dpo
    weight: 0.25
    optimum: 0.05
    beta: 0.2
    loss_type: ipo
    data: {{path: {ws}/pref.jsonl, format: preference, max_samples: 1800, max_len: 1024,
           eval_fraction: 0.03, seed: 7}}
  - kind: sft
    weight: 0.75
    optimum: 1.5
    data: {{path: {ws}/sft.jsonl, format: input_output, max_len: 512, eval_split: test, seed: 7}}
schedule: {{name: maxright, seed: 7, max_eval_steps: 5}}
optim: {{lr: 5.0e-6, scheduler: cosine, min_lr_ratio: 0.1, warmup_ratio: 0.03}}
train:
  output_dir: out/dpo-sft
  epochs: 3
  batch_size: 16
  micro_batch_size: 2
  seed: 7
  eval_steps: 20
  save_steps: 100
  keep_last: 1
  early_stop_eps: 0.01
  ref_pareto: [[0.31, 1.71], [0.21, 1.91]]   # the seeds stop within eps of a reference point
dist: {{zero_stage: {zero2}, offload_optimizer: true, offload_reference: true, zero_hpz_partition_size: 8}}
"""


@pytest.mark.parametrize("line, yaml_text", [(KD_SFT, KD_SFT_YAML), (DPO_SFT, DPO_SFT_YAML)],
                         ids=["bipost-kd-sft", "alright-dpo-sft"])
def test_seed_command_line_is_the_equivalent_yaml(tmp_path, line, yaml_text):
    from_cli = config_from_argv(seed_line(line))
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text.format(ws=workspace(), zero3=3, zero2=2))
    from_yaml = load_config(path)
    for got, want in zip(from_cli.train.ref_pareto, from_yaml.train.ref_pareto, strict=True):
        assert got == pytest.approx(want)
    from_cli.train.ref_pareto = from_yaml.train.ref_pareto  # 0.3 + 0.01 is not exactly 0.31
    assert from_cli == from_yaml


def test_help_explains_the_lambda_convention(capsys):
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--lambd 0.25 with SFT first and DPO second is --obj_1 SFT --obj_2 DPO --lambd 0.75" in text.replace("`", "")


def test_lambda_is_the_weight_of_obj_1():
    cfg = config_from_argv(seed_line(KD_SFT) + ["--lambd", "0.8"])
    assert [(o.kind, o.weight) for o in cfg.objectives] == [("kd", 0.8), ("sft", pytest.approx(0.2))]


@pytest.mark.parametrize("extra, message", [
    (["--not_a_flag", "1"], "unrecognized arguments: --not_a_flag"),
    (["--obj_1", "PPO"], "'PPO' is not an objective"),
    (["--obj_1", "KD", "--ref_model", ""], "--obj_1 KD needs a teacher model: pass --ref_model"),
    (["--obj_1", "DPO", "--dpo_ipo", "--dpo_label_smoothing", "0.1", "--ref_model", ""],
     "--dpo_ipo and --dpo_label_smoothing contradict"),
    (["--lambd", "1.5"], "--lambd is obj_1's weight and must be in [0, 1]"),
    (["--obj_1", "DPO", "--ref_model", "", "--input_key_2", "q"],
     "--input_key_2 applies only when both objectives are SFT/KD"),
    (["--obj_1", "SFT", "--ref_model", "{ws}/teacher"], "objective, but neither objective is"),
    (["--ref_model_2", "{ws}/teacher"], "--ref_model_2 is used only when both objectives need a model"),
    (["--eps", "0.1"], "--eps stops at f*: give both --obj_opt_1 and --obj_opt_2"),
    (["--ref_pareto_1", "1 2", "--ref_pareto_2", "1"], "give 2 and 1 values"),
    (["--load_in_4bit"], "--load_in_4bit is not supported"),
    (["--dataset_probs_1", "0.5,0.5"], "blending several datasets is not supported"),
    (["--eval_steps", "-5"], "--eval_steps takes a positive step count or -1"),
    (["--set", "schedule.name=nope"], "schedule.name must be one of"),
])
def test_bad_seed_flags_exit_2_with_a_clear_message(capsys, extra, message):
    code = main(seed_line(KD_SFT) + [e.format(ws=workspace()) for e in extra])
    assert code == 2
    assert message in capsys.readouterr().err


# Every pair, through the seed command line: obj_1, obj_2, extra flags (models as the seed assigns them).
PAIRS = {
    "sft+dpo": ("SFT", "DPO", []),
    "dpo+sft": ("DPO", "SFT", ["--ref_model", "{ws}/model"]),
    "kd+sft": ("KD", "SFT", ["--ref_model", "{ws}/teacher"]),
    "sft+sft": ("SFT", "SFT", ["--input_key_2", "input", "--output_key_2", "output"]),
    "kd+dpo": ("KD", "DPO", ["--ref_model", "{ws}/teacher"]),  # the DPO reference: the initial policy
    "dpo+dpo": ("DPO", "DPO", ["--ref_model_2", "{ws}/model", "--dpo_beta_2", "0.5", "--dpo_ipo_2"]),
    "kto+simpo": ("KTO", "SIMPO", ["--kto_beta", "0.2", "--simpo_gamma", "0.5"]),  # preference data for both
    "orpo+sft": ("ORPO", "SFT", ["--orpo_lambda", "0.2"]),
}
DATA = {"SFT": "sft.jsonl", "KD": "copy.jsonl", "DPO": "pref.jsonl", "KTO": "pref.jsonl", "SIMPO": "pref.jsonl",
        "ORPO": "pref.jsonl"}


@pytest.mark.parametrize("pair", PAIRS)
def test_every_objective_pair_runs_end_to_end(tmp_path, pair):
    """Two sequential steps (one per objective), a held-out evaluation of both at the end; the
    losses are finite and the run log says which objective ran in which step. (``--zero_stage 0``:
    the seeds' default 2 selects DeepSpeed, whose process group ends the process in ``main``.)"""
    o1, o2, extra = PAIRS[pair]
    ws = workspace()
    argv = ["--pretrain", f"{ws}/model", "--obj_1", o1, "--dataset_1", f"{ws}/{DATA[o1]}",
            "--obj_2", o2, "--dataset_2", f"{ws}/{DATA[o2]}", "--schedule", "sequential",
            "--train_batch_size", "4", "--micro_train_batch_size", "2", "--max_len", "64",
            "--max_samples_1", "40", "--max_samples_2", "40", "--learning_rate", "1e-3",
            "--save_path", str(tmp_path / "run"), "--zero_stage", "0",
            "--set", "train.max_steps=2", "--set", "train.progress=false",
            *[e.format(ws=ws) for e in extra]]
    assert main(argv) == 0
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train_recs = [r for r in records if r.get("kind", "train") == "train"]
    names = [o.name for o in config_from_argv(argv).objectives]
    assert [r["ran"] for r in train_recs] == [[names[0]], [names[1]]]
    assert all(math.isfinite(r[f"loss/{r['ran'][0]}"]) for r in train_recs)
    final_eval = [r for r in records if r.get("kind") == "eval"][-1]
    assert all(math.isfinite(final_eval[f"eval/{n}"]) for n in names)
    if pair == "dpo+dpo":
        cfg = config_from_argv(argv)
        assert (cfg.objectives[0].beta, cfg.objectives[0].loss) == (0.1, "sigmoid")
        assert (cfg.objectives[1].beta, cfg.objectives[1].loss) == (0.5, "ipo")
        assert cfg.objectives[1].reference == f"{ws}/model" and cfg.objectives[0].reference is None


def test_load_checkpoint_really_resumes(tmp_path, capsys):
    """--load_checkpoint continues from SAVE_PATH's latest checkpoint: the resumed run's steps 3-4
    repeat the uninterrupted run's exactly (ALRIGHT draws included)."""
    ws = workspace()
    argv = ["--pretrain", f"{ws}/model", "--obj_1", "SFT", "--dataset_1", f"{ws}/sft.jsonl",
            "--obj_2", "KD", "--dataset_2", f"{ws}/copy.jsonl", "--ref_model", f"{ws}/teacher",
            "--train_batch_size", "4", "--micro_train_batch_size", "4", "--max_len", "64", "--seed", "3",
            "--learning_rate", "1e-3", "--save_steps", "2", "--zero_stage", "0", "--set", "train.max_steps=4",
            "--set", "train.progress=false", "--load_checkpoint"]
    assert main(argv + ["--save_path", str(tmp_path / "full")]) == 0
    full = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if r.get("kind", "train") == "train"]
    first_half = argv.copy()
    first_half[first_half.index("train.max_steps=4")] = "train.max_steps=2"
    assert main(first_half + ["--save_path", str(tmp_path / "cut"), "--save_steps", "1"]) == 0
    assert main(argv + ["--save_path", str(tmp_path / "cut")]) == 0
    assert "[resume] from" in capsys.readouterr().out
    cut = [r for r in read_metrics(tmp_path / "cut" / "metrics.jsonl") if r.get("kind", "train") == "train"]
    keys = ("step", "ran", "loss/sft", "loss/kd")
    assert [{k: r.get(k) for k in keys} for r in cut] == [{k: r.get(k) for k in keys} for r in full]

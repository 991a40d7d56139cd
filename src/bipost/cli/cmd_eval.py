"""``bipost eval TARGET [key=value ...]``: benchmarks and generation metrics of a saved run or model."""

from __future__ import annotations

import argparse

EPILOG = """\
TARGET is a run directory (its final/ model is evaluated), a run's final/ folder or one of its
checkpoints (checkpoints/step-N), or any model directory / hub name. A LoRA adapter is loaded onto
its base model. A run's config.yaml supplies the objectives (their held-out rows) and the eval
section; change them with key=value overrides, e.g.

  bipost eval runs/sft-dpo eval.generate=true eval.judge.model=OpenAssistant/reward-model-deberta-v3-large-v2
  bipost eval runs/sft-dpo/checkpoints/step-00000500 eval.benchmarks.0.task=mmlu eval.benchmarks.0.num_fewshot=1
  bipost eval meta-llama/Meta-Llama-3-8B eval.benchmarks.0.task=arc_easy eval.benchmarks.0.limit=200

A model that is not part of a run takes --config for objectives (or none: benchmarks only).
Writes <run>/eval/saved/<final|step-N>/ (or --out): metrics.json, benchmarks.json and
<objective>.samples.jsonl; prints the scores. Runs in one process (on the GPU if there is one)."""


def run(args) -> int:
    from bipost.evaluation.saved import evaluate_saved

    scores, folder = evaluate_saved(args.target, args.overrides, config=args.config, out=args.out)
    width = max((len(k) for k in scores), default=0)
    for key, value in scores.items():
        print(f"{key:<{width}}  {value:.4f}", flush=True)
    print(f"[eval] written to {folder}", flush=True)
    return 0


def register(sub) -> None:
    e = sub.add_parser("eval", help="benchmarks and generation metrics of a saved run, checkpoint or model",
                       description="Evaluate a saved run, checkpoint or model (eval section of the config).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("target", help="run directory, final/ folder, checkpoint, or model directory / hub name")
    e.add_argument("overrides", nargs="*", help="key.sub=value overrides (e.g. eval.generate=true)")
    e.add_argument("--config", default=None, help="YAML config for a model that is not part of a run")
    e.add_argument("--out", default=None, help="output folder (default: <run>/eval/saved/<final|step-N>)")
    e.set_defaults(func=run)

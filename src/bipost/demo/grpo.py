"""``bipost demo grpo``: GRPO next to SFT on a verifiable task, offline, in a few CPU minutes.

The tiny model first learns two instructions by SFT ("copy: a b c" -> "a b c", "reverse: a b c" ->
"c b a"; the *start* model). Then two objectives train it further:

* ``sft``: SFT on fresh rows of both instructions (the skill to keep);
* ``grpo``: GRPO on reverse prompts, 8 sampled completions per prompt, rewarded by exact match
  with the answer plus :func:`position_reward` (the fraction of letters in their place): a
  verifiable reward in [0, 2].

Each method gets the same number of optimizer steps from the start model: GRPO alone (ALRIGHT
with lambda = (0, 1): both objectives are evaluated, only GRPO trains), sequential (SFT, then
GRPO), mix, ALRIGHT and MAXRIGHT (lambda 0.5 each). GRPO alone raises the reverse reward and
erodes the SFT skill (the copy instruction); the methods that train both keep it. The table
reports each final model's held-out SFT loss, its greedy copy and reverse accuracy on 100 unseen
prompts each, its held-out greedy reward, the steps each objective ran and the training time
(generation included) relative to sequential; ``loss_space.png`` draws every method's held-out
(SFT loss, -reward) trajectory.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from bipost.configio import load_config
import bipost.demo.data as D
from bipost.tiny import save_tiny

METHODS = ("grpo alone", "sequential", "mix", "alright", "maxright")


def position_reward(prompts: Sequence[Any], completions: Sequence[str], *, output: Sequence[str],
                    **columns: Any) -> list[float]:
    """Partial credit: the fraction of the answer's letters that the completion has in the same
    place (of the longer of the two, so extra letters cost too)."""
    scores = []
    for completion, answer in zip(completions, output):
        got, want = str(completion).split(), answer.split()
        scores.append(sum(a == b for a, b in zip(got, want)) / max(len(got), len(want), 1))
    return scores


def _mixed(n: int, seed: int) -> list[dict]:
    rows = D.sft_rows(n // 2, task="copy", seed=seed) + D.sft_rows(n - n // 2, task="reverse", seed=seed + 1)
    random.Random(seed).shuffle(rows)
    return rows


def _start_model(out: Path, steps: int) -> Path:
    """A tiny model that knows both instructions a little (SFT on a mixture of them)."""
    from bipost.run import train

    warm = D.write_jsonl(out / "data" / "warmup.jsonl", _mixed(2000, seed=30))
    base = save_tiny(out / "base_model", D.corpus([D.sft_rows(500, "copy", 1), D.sft_rows(500, "reverse", 2)]),
                     vocab_size=256)
    cfg = load_config(overrides=[
        f"model.path={base}", "objectives.0.kind=sft", f"objectives.0.data.path={warm}",
        "objectives.0.data.max_len=64", f"train.max_steps={steps}", "train.batch_size=32",
        "train.micro_batch_size=32", f"train.output_dir={out / 'start'}", "train.progress=false",
        "optim.lr=3e-3", "optim.scheduler=cosine", "optim.warmup_steps=10"])
    return train(cfg).final_dir


def write_data(out: Path) -> tuple[Path, Path]:
    """The SFT rows (both instructions) and the GRPO prompts (reverse; ``output`` is the answer)."""
    return (D.write_jsonl(out / "data" / "sft.jsonl", _mixed(2000, seed=40)),
            D.write_jsonl(out / "data" / "reverse_prompts.jsonl", D.sft_rows(1000, task="reverse", seed=50)))


def demo_config(out: Path, start: Path, steps: int, method: str, data: tuple[Path, Path]):
    """The config of one method's run."""
    sft, reverse = data
    g = "objectives.1"
    overrides = [
        f"model.path={start}", f"train.output_dir={out / method.replace(' ', '-')}", "train.progress=false",
        f"train.max_steps={steps}", f"train.eval_steps={steps // 6 if steps >= 6 else steps}", "optim.lr=5e-4",
        "objectives.0.kind=sft", f"objectives.0.data.path={sft}", "objectives.0.batch_size=32",
        "objectives.0.micro_batch_size=32",
        f"{g}.kind=grpo", f"{g}.data.path={reverse}", f"{g}.batch_size=8", f"{g}.micro_batch_size=8",
        f"{g}.num_generations=8", f"{g}.max_new_tokens=12",
        f"{g}.rewards.0.function=exact_match", f"{g}.rewards.0.args.column=output",
        f"{g}.rewards.1.function=bipost.demo.grpo:position_reward",
        "objectives.0.data.eval_fraction=0.05", f"{g}.data.eval_fraction=0.1",
        *[f"objectives.{i}.data.max_len=64" for i in (0, 1)],
    ]
    if method == "grpo alone":  # both objectives evaluated, only GRPO trains
        overrides += ["schedule.name=alright", "objectives.0.weight=0", "objectives.1.weight=1"]
    else:
        overrides += [f"schedule.name={method}"]
    return load_config(overrides=overrides)


def run_grpo_demo(out: str | Path = "demo_out/grpo", quick: bool = False) -> dict:
    """Train every method (see the module docstring); print the table and where the outputs are."""
    from bipost.demo.run import exact_match
    from bipost.report.compare import run_method
    from bipost.report.loss_space import plot_trajectories

    t0 = time.time()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # see demo.run: a hidden-64 model gains nothing from a second thread
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    warm_steps, steps = (10, 3) if quick else (400, 60)
    start = _start_model(out, warm_steps)
    data = write_data(out)
    copy_rows, reverse_rows = D.sft_rows(100, "copy", seed=60), D.sft_rows(100, "reverse", seed=61)
    accuracy = {"copy": exact_match(start, copy_rows), "reverse": exact_match(start, reverse_rows)}
    print(f"[demo grpo] start model (SFT on copy + reverse, {warm_steps} steps): {start}; copy accuracy "
          f"{accuracy['copy']:.0%}, reverse accuracy {accuracy['reverse']:.0%}", flush=True)
    results = []
    for method in METHODS:
        cfg = demo_config(out, start, steps, method, data)
        print(f"[demo grpo] {method}: {steps} steps -> {cfg.train.output_dir}", flush=True)
        r = run_method(cfg, "alright" if method == "grpo alone" else method, Path(cfg.train.output_dir))
        r.method = method
        final = Path(cfg.train.output_dir) / "final"
        results.append({"method": method, "sft_loss": r.final["sft"], "reward": -r.final["grpo"],
                        "copy_accuracy": exact_match(final, copy_rows),
                        "reverse_accuracy": exact_match(final, reverse_rows),
                        "steps_grpo": r.ran.get("grpo", 0), "steps_sft": r.ran.get("sft", 0),
                        "wall_time_s": r.wall_time, "trajectory": r.eval_history})
    first = {**results[0]["trajectory"][0], "copy_accuracy": accuracy["copy"], "reverse_accuracy": accuracy["reverse"]}
    seq = next(x for x in results if x["method"] == "sequential")
    for x in results:
        x["time_vs_sequential"] = x["wall_time_s"] / seq["wall_time_s"] if seq["wall_time_s"] > 0 else None
    table = _table(first, results)
    (out / "table.md").write_text(table)
    (out / "results.json").write_text(json.dumps({"start": first, "steps": steps, "results": results}, indent=1))
    plot = plot_trajectories(
        {x["method"]: x["trajectory"] for x in results}, ["sft", "grpo"], out / "loss_space.png",
        labels={x["method"]: x["method"] for x in results},
        title=f"SFT (copy + reverse) and GRPO (reverse, reward = exact match + letters in place), {steps} steps each\n"
              f"held-out SFT loss vs held-out -reward of greedy answers; lower-left is better",
        axis_label=lambda n: "held-out SFT loss" if n == "sft" else "held-out GRPO -reward (greedy; -2 is perfect)")
    print(table, flush=True)
    print(f"[demo grpo] done in {time.time() - t0:.0f}s: table {out / 'table.md'}, plot {plot}", flush=True)
    return {"start": first, "results": results, "plot": plot}


def _table(start: dict, results: list[dict]) -> str:
    lines = ["| method | SFT held-out loss | copy accuracy | reverse reward (of 2) | reverse accuracy | "
             "steps GRPO / SFT | time vs sequential |", "|---|---:|---:|---:|---:|---:|---:|",
             f"| start | {start['sft']:.3f} | {start['copy_accuracy']:.0%} | {-start['grpo']:.3f} | "
             f"{start['reverse_accuracy']:.0%} | | |"]
    for x in results:
        t = x["time_vs_sequential"]
        lines.append(f"| {x['method']} | {x['sft_loss']:.3f} | {x['copy_accuracy']:.0%} | {x['reward']:.3f} | "
                     f"{x['reverse_accuracy']:.0%} | {x['steps_grpo']} / {x['steps_sft']} | "
                     f"{'–' if t is None else f'{t:.2f}×'} |")
    return "\n".join(lines) + "\n"

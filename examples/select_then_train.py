"""Select -> filter -> train, at a larger scale than the tests (CPU, a few minutes, offline).

The trusted data (dataset_1) is the "reverse" task ("reverse: a b c" -> "c b a"). The noisy data
(dataset_2) is the same task with a share of planted bad rows of three kinds:

* ``foreign``: a wrong answer in letters the task never outputs ("reverse: a b c" -> "p k s");
* ``prompt``: the prompt copied as the answer ("reverse: a b c" -> "reverse: a b c");
* ``copy``: the input letters unchanged, the *other* task's answer ("reverse: a b c" -> "a b c") —
  only wrong for a model that knows the order matters.

1. ``bipost select``: the model trains on u * f_1(dataset_1) + (1 - u) * mean_i w_i l_i(dataset_2)
   while the selector learns the weights w (softmax, Adam).
2. ``select filter --top-p``: keep the highest-weighted rows of the original file.
3. The downstream effect: SFT from the base model on (a) the unfiltered noisy data, (b) the filtered
   data and (c) a random subset of the same size as (b) (so "less data" is not mistaken for "better
   data"), same steps; each is scored on held-out trusted rows: f_1 (token-mean NLL) and exact match.

Run:  python examples/select_then_train.py --out select_example   (add --quick for a smoke run)
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import torch

from bipost.config import DataConfig
from bipost.configio import load_config
from bipost.data import load_objective_data
from bipost.data.collate import collate_sft
from bipost.demo import data as D
from bipost.demo.run import exact_match
from bipost.selector import filter_rows, read_weights
from bipost.tiny import save_tiny
from bipost.run import train
from bipost.kinds import make_objective

KINDS = ("foreign", "prompt", "copy")


def noisy_rows(n: int, noise: float, seed: int) -> tuple[list[dict], dict[int, str]]:
    """``n`` reverse rows, a ``noise`` share of them planted (kinds in turn); returns rows and {row id: kind}."""
    rng = random.Random(seed)
    rows = D.sft_rows(n, task="reverse", seed=seed)
    planted = {i: KINDS[j % len(KINDS)] for j, i in enumerate(sorted(rng.sample(range(n), round(noise * n))))}
    for i, kind in planted.items():
        seq = rows[i]["input"].split(": ", 1)[1].split()
        if kind == "foreign":
            rows[i]["output"] = " ".join(rng.choice("klmnopqrst") for _ in seq)
        elif kind == "prompt":
            rows[i]["output"] = rows[i]["input"]
        else:
            rows[i]["output"] = D.answer("copy", seq)
    return rows, planted


@torch.no_grad()
def heldout_f1(model_dir: Path, path: Path) -> float:
    """Token-mean NLL of the responses of ``path`` (the trusted task's held-out rows)."""
    from transformers import AutoModelForCausalLM

    from bipost.models import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    data = load_objective_data(DataConfig(path=str(path), max_len=64), "sft", tok)
    out = make_objective("sft").loss(model, collate_sft(data.train, tok.pad_token_id))
    return float(out.losses.sum() / out.units.sum())


def sft_run(base: Path, data: Path, out: Path, steps: int, seed: int) -> Path:
    cfg = load_config(overrides=[
        f"model.path={base}", "objectives.0.kind=sft", f"objectives.0.data.path={data}",
        "objectives.0.data.max_len=64", f"train.max_steps={steps}", "train.batch_size=32",
        "train.micro_batch_size=32", f"train.output_dir={out}", f"train.seed={seed}", "train.progress=false",
        "optim.lr=3e-3", "optim.scheduler=cosine", "optim.warmup_steps=20",
    ])
    return train(cfg).final_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="select_example")
    p.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    p.add_argument("--noise", type=float, default=0.3, help="share of planted rows in dataset_2")
    p.add_argument("--top-p", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    t0 = time.time()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    n1, n2, select_steps, sft_steps = (64, 96, 20, 20) if args.quick else (400, 900, 240, 400)

    trusted = D.sft_rows(n1, task="reverse", seed=args.seed + 1)
    heldout = D.sft_rows(200, task="reverse", seed=args.seed + 2)
    noisy, planted = noisy_rows(n2, args.noise, seed=args.seed + 3)
    d1 = D.write_jsonl(out / "data" / "trusted.jsonl", trusted)
    dh = D.write_jsonl(out / "data" / "heldout.jsonl", heldout)
    d2 = D.write_jsonl(out / "data" / "noisy.jsonl", noisy)
    base = save_tiny(out / "base_model", D.corpus([trusted, noisy, D.sft_rows(50, task="copy")]), vocab_size=256)
    print(f"[example] dataset_1: {n1} trusted reverse rows; dataset_2: {n2} rows, {len(planted)} planted "
          f"({', '.join(f'{k}: {sum(v == k for v in planted.values())}' for k in KINDS)})")

    # 1. selection: dataset_1 upper level, dataset_2 lower level; u = 0.5 (constant)
    sel_cfg = load_config(overrides=[
        f"model.path={base}", f"train.output_dir={out / 'select'}", "train.progress=false",
        f"train.max_steps={select_steps}", f"train.seed={args.seed}", "optim.lr=3e-3",
        "optim.scheduler=cosine", "optim.warmup_steps=20",
        "objectives.0.kind=sft", f"objectives.0.data.path={d1}", "objectives.0.data.max_len=64",
        "objectives.0.batch_size=32", "objectives.0.micro_batch_size=32",
        "objectives.1.kind=sft", f"objectives.1.data.path={d2}", "objectives.1.data.max_len=64",
        "objectives.1.batch_size=64", "objectives.1.micro_batch_size=32",
        "selector.enabled=true", "selector.lr=0.05", "selector.warmup_steps=20",
        "selector.save_epoch_models=false", "selector.every_epochs=5",
    ])
    train(sel_cfg)
    sel_dir = out / "select" / "selector"
    table, _ = read_weights(sel_dir / "weights.parquet")
    k = len(planted)
    bottom = table["row_id"][-k:]
    precision = sum(r in planted for r in bottom) / k
    caught = {kind: sum(planted.get(r) == kind for r in bottom) / max(1, sum(v == kind for v in planted.values()))
              for kind in KINDS}
    mean_w = {kind: sum(w for r, w in zip(table["row_id"], table["weight"]) if planted.get(r) == kind)
              / max(1, sum(v == kind for v in planted.values())) for kind in KINDS}
    clean_w = [w for r, w in zip(table["row_id"], table["weight"]) if r not in planted]
    mean_w["clean"] = sum(clean_w) / len(clean_w)
    print(f"[example] bottom-{k} precision: {precision:.3f}; share of each kind in the bottom {k}: "
          + ", ".join(f"{kind} {v:.2f}" for kind, v in caught.items()))
    print("[example] mean weight by kind: " + ", ".join(f"{kind} {v:.3f}" for kind, v in mean_w.items()))
    print(f"[example] weight histogram: {sel_dir / 'weights_hist.png'}; summary: {sel_dir / 'summary.md'}")

    # 2. filter: the top rows of the original file, unchanged
    res = filter_rows(sel_dir / "weights.parquet", None, out / "data" / "filtered.jsonl", top_p=args.top_p)
    kept_ids = {r for r in table["row_id"][: res.kept]}
    print(f"[example] filter top-p {args.top_p}: {res}; planted rows left: "
          f"{sum(r in planted for r in kept_ids)} of {len(planted)}")
    rng = random.Random(args.seed)
    random_ids = set(rng.sample(range(n2), res.kept))
    dr = D.write_jsonl(out / "data" / "random_subset.jsonl", [r for i, r in enumerate(noisy) if i in random_ids])

    # 3. downstream: plain SFT on each variant, same budget, scored on held-out trusted rows
    results = {}
    for name, data in (("unfiltered", d2), ("random subset", dr), ("filtered (selector)", res.out)):
        final = sft_run(base, data, out / "sft" / name.split()[0], sft_steps, args.seed)
        results[name] = {"rows": sum(1 for _ in open(data)),
                         "planted": sum(r in planted for r in (range(n2) if data == d2 else
                                                               random_ids if data == dr else kept_ids)),
                         "f1_heldout": heldout_f1(final, dh), "exact_match": exact_match(final, heldout[:100])}
    base_f1 = heldout_f1(base, dh)
    lines = ["| SFT data | rows | planted rows | held-out f_1 (NLL) | exact match (100 prompts) |",
             "|---|---:|---:|---:|---:|",
             f"| (base model, no training) | - | - | {base_f1:.3f} | - |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['rows']} | {r['planted']} | {r['f1_heldout']:.3f} | {r['exact_match']:.0%} |")
    print("\n".join(lines))
    (out / "result.json").write_text(json.dumps({"precision": precision, "caught": caught, "mean_weight": mean_w,
                                                 "downstream": results}, indent=2))
    print(f"[example] done in {time.time() - t0:.0f}s; outputs in {out}")


if __name__ == "__main__":
    main()

"""Benchmark: bipost's ``grpo`` objective beside TRL's GRPOTrainer, same model, prompts, group size and
lengths, in one run.

    python bench/grpo.py                     # CPU, both frameworks, a few minutes
    python bench/grpo.py --only bipost --steps 4

The workload, identical for every config: a Qwen2-architecture model with random weights (the CPU
preset of ``bench/run.py``: hidden 256, 4 layers, 4 heads / 2 KV heads, intermediate 768, a
byte-level BPE vocabulary of 2,048 trained on the prompts' words), fp32, SDPA; prompts of exactly
``prompt`` tokens (random words, each one token); per optimizer step 8 prompts x 8 sampled
completions (temperature 1) of at most ``completion`` new tokens, generated with Hugging Face
``generate`` and its KV cache in one batch of 64 (no vLLM: no GPU here); the same reward function
(:func:`bench_reward`); loss ``dapo``, ``beta = 0`` (no reference), one generation per step
(``num_iterations = 1``), AdamW at lr 1e-6, no gradient checkpointing (TRL's default is on: the
``trl-ckpt`` config keeps it). A random model rarely samples EOS, so nearly every completion is
``completion`` tokens long in both frameworks.

Every config runs in its own subprocess (its peak RSS is its own): ``warmup`` untimed steps, then
``steps`` timed ones; a step's time runs from the end of the previous step to the end of this one
(generation, rewards, forward, backward, optimizer: everything). Reported: steps/s (best window of
4 steps, as ``bench/run.py``; the mean too), generated tokens per second of training (completion
tokens / step time), bipost's generation-phase tokens/s, and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

ROOT = Path(__file__).resolve().parents[1]
P = dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768, vocab=2048, prompts=8, generations=8,
         prompt=32, completion=64, rows=256, warmup=2, steps=12)
WINDOW = 4


def bench_reward(completions, **columns) -> list[float]:
    """The fraction of a completion's characters that are letters (cheap; the same in both)."""
    return [sum(ch.isalpha() for ch in c) / max(len(c), 1) for c in completions]


# ====================================================================== workspace
def build_workspace(out: Path) -> Path:
    """Tokenizer, random model and prompts under ``out/work-grpo`` (built once per preset)."""
    ws = out / "work-grpo"
    stamp = json.dumps(P, sort_keys=True)
    if (ws / "done").exists() and (ws / "done").read_text() == stamp:
        return ws
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from bipost.tiny import build_tokenizer

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = sorted({"".join(rng.choice(letters) for _ in range(rng.randint(3, 7))) for _ in range(3000)})
    corpus = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(2000)]
    ws.mkdir(parents=True, exist_ok=True)
    build_tokenizer(corpus, vocab_size=P["vocab"]).save_pretrained(ws / "model")
    tok = AutoTokenizer.from_pretrained(ws / "model")
    single = [w for w in words if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=P["hidden"], intermediate_size=P["intermediate"],
                      num_hidden_layers=P["layers"], num_attention_heads=P["heads"],
                      num_key_value_heads=P["kv_heads"], max_position_embeddings=1024, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      use_sliding_window=False)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(ws / "model")
    # P["prompt"] tokens with the tokenizer's BOS: BOS + (prompt - 1) one-token words.
    rows = [{"prompt": "".join(" " + rng.choice(single) for _ in range(P["prompt"] - 1)).lstrip()}
            for _ in range(P["rows"])]
    with open(ws / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (ws / "done").write_text(stamp)
    return ws


# ====================================================================== measurement
def _best_window(times: list[float], counts: list[float]) -> float:
    spans = [(sum(counts[i:i + WINDOW]), sum(times[i:i + WINDOW])) for i in range(0, len(times), WINDOW)]
    return max(c / t for c, t in spans if t > 0) if spans else 0.0


def _result(name: str, times: list[float], gen_tokens: list[float], extra: dict) -> dict:
    total = sum(times)
    return {"name": name, "steps": len(times), "time": total,
            "steps_per_s": _best_window(times, [1.0] * len(times)),
            "steps_per_s_mean": len(times) / total if total else 0.0,
            "gen_tokens_per_s": _best_window(times, gen_tokens),
            "completion_length": sum(gen_tokens) / max(len(gen_tokens), 1) / (P["prompts"] * P["generations"]),
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}


# ====================================================================== bipost
def run_bipost(ws: Path, spec: dict, out: Path) -> dict:
    from bipost.configio import load_config
    from bipost.run import build_trainer

    total = spec["warmup"] + spec["steps"]
    g = "objectives.0"
    cfg = load_config(overrides=[
        f"model.path={ws / 'model'}", "model.dtype=float32", "model.attn_implementation=sdpa",
        f"train.output_dir={out}", "train.progress=false", f"train.max_steps={total}",
        "optim.lr=1e-6", "optim.betas=[0.9,0.999]", f"train.packing={str(spec.get('packing', False)).lower()}",
        f"{g}.kind=grpo", f"{g}.data.path={ws / 'prompts.jsonl'}", f"{g}.data.max_len={P['prompt']}",
        f"{g}.batch_size={P['prompts']}", f"{g}.micro_batch_size={P['prompts']}",
        f"{g}.num_generations={P['generations']}", f"{g}.max_new_tokens={P['completion']}",
        f"{g}.loss=dapo", f"{g}.rewards.0.function=grpo:bench_reward"])
    trainer = build_trainer(cfg)
    times, gen, phase = [], [], []
    last = time.perf_counter()
    for step in range(total):
        rec = trainer.train_step(step)
        now = time.perf_counter()
        if step >= spec["warmup"]:
            times.append(now - last)
            gen.append(rec["grpo/completion_length"] * P["prompts"] * P["generations"])
            phase.append(rec["grpo/gen_tokens_per_s"])
        last = now
    return _result(spec["name"], times, gen, {"generation_phase_tokens_per_s": sum(phase) / len(phase)})


# ====================================================================== TRL
def run_trl(ws: Path, spec: dict, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(ws / "model")
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(ws / "model", dtype=torch.float32, attn_implementation="sdpa")
    rows = [json.loads(line) for line in open(ws / "prompts.jsonl")]
    n = P["prompts"] * P["generations"]
    args = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=n, gradient_accumulation_steps=1,
        num_generations=P["generations"], max_completion_length=P["completion"], temperature=1.0,
        max_steps=spec["warmup"] + spec["steps"], learning_rate=1e-6, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=1.0, beta=0.0, num_iterations=1, loss_type="dapo", logging_steps=10**6,
        save_strategy="no", report_to=[], disable_tqdm=True, seed=42, bf16=False, dataloader_num_workers=0,
        gradient_checkpointing=spec.get("ckpt", False), use_cpu=not torch.cuda.is_available(), use_vllm=False)
    trainer = GRPOTrainer(model=model, reward_funcs=[bench_reward], args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tok)
    lengths = trainer._metrics["train"]["completions/mean_length"]  # appended once per generation

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.gen, self.last = [], [], None

        def on_train_begin(self, args, state, control, **kw):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            if state.global_step > spec["warmup"]:
                self.times.append(now - self.last)
                self.gen.append(lengths[-1] * n)
            self.last = now

    timer = Timer()
    trainer.add_callback(timer)
    trainer.train()
    return _result(spec["name"], timer.times, timer.gen, {})


# ====================================================================== orchestration
CONFIGS = [
    dict(name="bipost", framework="bipost"),
    dict(name="bipost-packed", framework="bipost", packing=True),
    dict(name="trl", framework="trl"),
    dict(name="trl-ckpt", framework="trl", ckpt=True),
]


def table(results: list[dict]) -> str:
    lines = ["| config | steps/s (best 4) | steps/s (mean) | generated tokens/s | completion length | peak RSS (MiB) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error'][:80]} | | | | |")
            continue
        lines.append(f"| {r['name']} | {r['steps_per_s']:.3f} | {r['steps_per_s_mean']:.3f} | "
                     f"{r['gen_tokens_per_s']:,.0f} | {r['completion_length']:.1f} | {r['peak_mib']:,.0f} |")
    by = {r["name"]: r for r in results if "error" not in r}
    trl = [r for n, r in by.items() if n.startswith("trl")]
    mine = [r for n, r in by.items() if n.startswith("bipost")]
    if trl and mine:
        best, ours = max(trl, key=lambda r: r["steps_per_s"]), max(mine, key=lambda r: r["steps_per_s"])
        lines += ["", f"bipost best ({ours['name']}) / TRL best ({best['name']}): "
                      f"**{ours['steps_per_s'] / best['steps_per_s']:.2f}x** steps/s, "
                      f"{ours['gen_tokens_per_s'] / best['gen_tokens_per_s']:.2f}x generated tokens/s, "
                      f"peak RSS {ours['peak_mib']:,.0f} vs {best['peak_mib']:,.0f} MiB "
                      f"({ours['peak_mib'] / best['peak_mib']:.2f}); TRL's lowest peak "
                      f"{min(r['peak_mib'] for r in trl):,.0f} MiB"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated config name prefixes")
    ap.add_argument("--steps", type=int, default=0, help=f"timed steps per config (default {P['steps']})")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per config")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if a.worker:
        spec = json.loads(a.worker)
        run_out = out / "runs" / f"grpo-{spec['name']}"
        run_out.mkdir(parents=True, exist_ok=True)
        ws = out / "work-grpo"
        try:
            res = (run_bipost if spec["framework"] == "bipost" else run_trl)(ws, spec, run_out)
        except Exception as err:  # reported in the table; the other configs still run
            import traceback

            traceback.print_exc()
            res = {"name": spec["name"], "error": f"{type(err).__name__}: {err}"}
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    import torch
    import transformers

    # As bench/run.py: glibc's page return/fault churn and a descheduled second OpenMP thread
    # dominate CPU steps on a shared machine; the same settings for every framework.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**32))
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(2**36))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    build_workspace(out)
    only = set(filter(None, a.only.split(",")))
    specs = [dict(c, warmup=P["warmup"], steps=a.steps or P["steps"]) for c in CONFIGS
             if not only or any(c["name"].startswith(o) for o in only)]
    results = []
    t_all = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    for spec in specs:
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--out", str(out), "--worker", json.dumps(spec)],
                                  capture_output=True, text=True, env=env, timeout=a.timeout)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            res = json.loads(line[-1][7:]) if line else {"name": spec["name"], "error": proc.stderr[-300:]}
            if "error" in res:
                (out / "errors.log").open("a").write(f"== {spec['name']}\n{proc.stderr[-5000:]}\n")
        except subprocess.TimeoutExpired:
            res = {"name": spec["name"], "error": f"timeout after {a.timeout}s"}
        results.append(res)
        msg = res.get("error") or f"{res['steps_per_s']:.3f} steps/s, peak {res['peak_mib']:,.0f} MiB"
        print(f"[{time.perf_counter() - t0:6.1f}s] {spec['name']}: {msg}", flush=True)
    import trl

    header = (f"device: CPU ({os.cpu_count()} cores); torch {torch.__version__}, transformers "
              f"{transformers.__version__}, trl {trl.__version__}; workload {P}; {time.strftime('%Y-%m-%d %H:%M')}; "
              f"total {time.perf_counter() - t_all:.0f}s")
    text = header + "\n\n" + table(results) + "\n"
    (out / "results-grpo.json").write_text(json.dumps({"header": header, "results": results}, indent=1))
    (out / "table-grpo.md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

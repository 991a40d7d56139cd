"""Benchmark: bipost's SFT / DPO / KD / ALRIGHT / MAXRIGHT / mix / sequential steps, and TRL's
SFTTrainer and DPOTrainer in their best settings, on the same model and data, in one run.

    python bench/run.py              # CPU preset: small model, a few minutes
    python bench/run.py --gpu        # Qwen2-0.5B shape (random init), bf16, SDPA, batch 8, 256 + 256
    python bench/run.py --only bipost-sft,trl-sft --steps 10

Every configuration runs in its own subprocess (``--worker``), so peak memory is its own: peak
RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU. A configuration takes ``warmup`` steps,
then ``steps`` timed ones; a step's time runs from the end of the previous step to the end of
this one (data collation, forward, backward, optimizer: everything), with the device synchronised.

tokens/s counts the data's real tokens: prompt + response per SFT/KD example, and
prompt + chosen + prompt + rejected per DPO pair, whatever the framework does with them (padding
is not counted; bipost's shared prompt is counted twice although it is computed once). MFU on GPU
is ``(6 N + causal attention) x tokens / time / 989 TFLOP/s`` (N: parameters without the input
embedding; H100 SXM bf16 dense peak).

Data sets: ``synthetic`` (every prompt and response exactly the preset's lengths) and ``hh``
(real variable-length pairs from ``../shared/data/hh-rlhf-harmless-base-test.jsonl.gz``; read only
here). The tokenizer is a byte-level BPE trained on that text (no hub access). TRL's candidates
(padded / padding-free for SFT; precomputed reference log-probs for DPO; Liger kernels on GPU)
are all run and the fastest one whose first-step loss matches the padded run's is "TRL best".
"""

from __future__ import annotations

import argparse
import gzip
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
HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
PEAK_FLOPS = 989e12  # H100 SXM, bf16 dense

PRESETS = {
    "cpu": dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768, vocab=None, tie=False,
                dtype="float32", batch=8, prompt=128, completion=128, max_len=384, steps=8, warmup=2,
                rows=128, sched_steps=16, vocab_train=8192),
    "gpu": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, tie=True,
                dtype="bfloat16", batch=8, prompt=256, completion=256, max_len=512, steps=12, warmup=4,
                rows=256, sched_steps=16, vocab_train=16384),
}


# ====================================================================== workspace
def hh_rows(path: Path, limit: int) -> list[dict]:
    """HH pairs split into prompt (up to and incl. the last "\\n\\nAssistant:") and responses."""
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            cut = r["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
            prompt = r["chosen"][:cut]
            if not r["rejected"].startswith(prompt):
                continue
            chosen, rejected = r["chosen"][cut:], r["rejected"][cut:]
            if chosen.strip() and rejected.strip() and chosen != rejected:
                rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            if len(rows) >= limit:
                break
    return rows


def synthetic_rows(tokenizer, n: int, prompt: int, completion: int, seed: int = 0) -> list[dict]:
    """Rows whose prompt and responses are exactly ``prompt`` / ``completion`` tokens: random
    words that are single tokens with their leading space (byte-level pre-tokenisation isolates
    each, so they never merge)."""
    words = [w for w, i in tokenizer.get_vocab().items()
             if w.startswith("Ġ") and w[1:].isalpha() and len(tokenizer(" " + w[1:], add_special_tokens=False)
                                                              ["input_ids"]) == 1]
    words = sorted(w.replace("Ġ", " ") for w in words)[:2000]
    rng = random.Random(seed)

    def text(k: int) -> str:
        return "".join(rng.choice(words) for _ in range(k))

    # The EOS both frameworks append makes responses completion tokens long (content: completion - 1).
    return [{"prompt": text(prompt - 1), "chosen": text(completion - 1), "rejected": text(completion - 1)}
            for _ in range(n)]


def build_workspace(preset: str, out: Path, hh: Path = HH) -> Path:
    """Tokenizer, model and data sets for a preset under ``out/work-<preset>`` (built once)."""
    p = PRESETS[preset]
    ws = out / f"work-{preset}"
    stamp = json.dumps(p, sort_keys=True)
    if (ws / "done").exists() and (ws / "done").read_text() == stamp:
        return ws
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from bipost.tiny import build_tokenizer

    ws.mkdir(parents=True, exist_ok=True)
    hh = hh_rows(hh, 100_000)
    texts = [r["prompt"] + r["chosen"] for r in hh[:1500]]
    tok = build_tokenizer(texts, vocab_size=p["vocab_train"])
    tok.save_pretrained(ws / "model")
    tok = AutoTokenizer.from_pretrained(ws / "model")
    cfg = Qwen2Config(
        vocab_size=p["vocab"] or len(tok), hidden_size=p["hidden"], intermediate_size=p["intermediate"],
        num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
        max_position_embeddings=4096, tie_word_embeddings=p["tie"], bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, use_sliding_window=False,
    )
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for seed, name in ((0, "model"), (1, "teacher")):  # KD teacher: same architecture, other weights
        torch.manual_seed(seed)
        with torch.device(dev):
            model = Qwen2ForCausalLM(cfg).to(getattr(torch, p["dtype"]))
        model.save_pretrained(ws / name)
        del model
    tok.save_pretrained(ws / "teacher")
    if dev == "cuda":
        torch.cuda.empty_cache()
    synth = synthetic_rows(tok, p["rows"], p["prompt"], p["completion"])
    for name, rows in (("synthetic", synth), ("hh", hh[: p["rows"]])):
        with open(ws / f"{name}-pref.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        with open(ws / f"{name}-sft.jsonl", "w") as f:
            f.writelines(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n" for r in rows)
    (ws / "done").write_text(stamp)  # a changed preset rebuilds the workspace
    return ws


# ====================================================================== measurement helpers
def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_memory() -> tuple[str, float]:
    import torch

    if torch.cuda.is_available():
        return "GiB", torch.cuda.max_memory_allocated() / 2**30
    return "MiB RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model_flops_per_token(ws: Path, seq_lens: list[int]) -> float:
    """Training FLOPs per token: 6 N (N without the input embedding) + causal attention
    (6 L d s per token of a length-s sequence, averaged over the batch's sequences)."""
    cfg = json.loads((ws / "model" / "config.json").read_text())
    d, L, V, f = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["intermediate_size"]
    kv = d // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f
    n = L * per_layer + V * d
    tokens = sum(seq_lens)
    attn = sum(6 * L * d * s * s for s in seq_lens) / max(tokens, 1)
    return 6 * n + attn


WINDOW = 4
"""Timed steps are scored in windows of this many; a config's throughput is its best window's
(on a shared machine a window that lost the CPU to another process says nothing about the code)."""


def _best_window(times: list[float], tokens: list[int]) -> float:
    spans = [(sum(tokens[i:i + WINDOW]), sum(times[i:i + WINDOW])) for i in range(0, len(times), WINDOW)]
    return max(tok / t for tok, t in spans if t > 0) if spans else 0.0


def _result(name: str, times: list[float], tokens: list[int], extra: dict | None = None,
            cpu_times: list[float] | None = None) -> dict:
    unit, peak = _peak_memory()
    total_t = sum(times)
    out = {"name": name, "steps": len(times), "time": total_t, "tokens": sum(tokens),
           "tokens_per_s": _best_window(times, tokens),
           "tokens_per_s_mean": sum(tokens) / total_t if total_t else 0.0, "peak": peak, "peak_unit": unit}
    if cpu_times:
        out["tokens_per_cpu_s"] = _best_window(cpu_times, tokens)
    out.update(extra or {})
    return out


# ====================================================================== bipost worker
def bipost_overrides(ws: Path, spec: dict, out: Path) -> list[str]:
    p = PRESETS[spec["preset"]]
    data = spec["data"]
    ov = [f"model.path={ws / 'model'}", f"model.dtype={p['dtype']}", "model.attn_implementation=sdpa",
          f"train.output_dir={out}", "train.progress=false", f"train.max_steps={spec['total']}",
          f"train.batch_size={spec.get('batch', p['batch'])}",
          f"train.micro_batch_size={spec.get('micro', spec.get('batch', p['batch']))}",
          "optim.lr=1e-5", f"train.packing={str(spec.get('packing', True)).lower()}",
          f"train.logits={spec.get('logits', 'auto')}", f"train.cache_dir={out}/cache"]
    if spec.get("compile"):
        ov.append("model.compile=true")
    if spec.get("chunk"):
        ov.append(f"train.logits_chunk_size={spec['chunk']}")
    for i, kind in enumerate(spec["kinds"]):
        path = ws / f"{data}-{'pref' if kind == 'dpo' else 'sft'}.jsonl"
        ov += [f"objectives.{i}.kind={kind}", f"objectives.{i}.data.path={path}",
               f"objectives.{i}.data.max_len={p['max_len']}"]
        if kind == "dpo":
            ov.append(f"objectives.{i}.cache_reference={str(spec.get('cache', True)).lower()}")
        if kind == "kd":
            ov.append(f"objectives.{i}.teacher={ws / 'teacher'}")
            if spec.get("kd_topk"):
                ov += [f"objectives.{i}.kd_topk={spec['kd_topk']}",
                       f"objectives.{i}.cache_teacher={str(spec.get('cache', True)).lower()}"]
    if len(spec["kinds"]) > 1:
        ov.append(f"schedule.name={spec['schedule']}")
    return ov


def run_bipost(ws: Path, spec: dict, out: Path) -> dict:
    import torch

    from bipost.configio import load_config
    from bipost.run import build_trainer

    torch.manual_seed(0)
    spec["total"] = spec["warmup"] + spec["steps"]
    cfg = load_config(overrides=bipost_overrides(ws, spec, out))
    t0 = time.perf_counter()
    trainer = build_trainer(cfg)
    setup_s = time.perf_counter() - t0
    counted: list[int] = []
    lens: list[int] = []

    # Collation may run a micro-batch ahead in a thread (train.prefetch): each batch carries its
    # own token count, read when the trainer takes it.
    def counting(collate, kind):
        def wrapped(examples):
            if kind == "dpo":
                ls = [len(e.prompt_ids) + len(e.chosen_ids) for e in examples] + \
                     [len(e.prompt_ids) + len(e.rejected_ids) for e in examples]
            else:
                ls = [len(e) for e in examples]
            batch = collate(examples)
            batch["_bench_lens"] = ls
            return batch
        return wrapped

    def taking(next_fn):
        def wrapped():
            batch = next_fn()
            ls = batch.pop("_bench_lens")
            counted.append(sum(ls))
            lens.extend(ls)
            return batch
        return wrapped

    for r in trainer.runs.values():
        r.stream.collate_fn = counting(r.stream.collate_fn, r.cfg.kind)
        r.stream.next = taking(r.stream.next)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times, tokens, cpu = [], [], []
    _sync()
    last, last_cpu = time.perf_counter(), time.process_time()
    for step in range(spec["total"]):
        counted.clear()
        trainer.train_step(step)
        _sync()
        now, now_cpu = time.perf_counter(), time.process_time()
        if step >= spec["warmup"]:
            times.append(now - last)
            cpu.append(now_cpu - last_cpu)
            tokens.append(sum(counted))
        last, last_cpu = now, now_cpu
    extra = {"setup_s": setup_s}
    if spec.get("compile"):
        from torch._dynamo.utils import counters

        extra["graphs"] = counters["stats"]["unique_graphs"]  # recompiles show up here
    if torch.cuda.is_available():
        fpt = _model_flops_per_token(ws, lens)
        extra["mfu"] = fpt * _best_window(times, tokens) / PEAK_FLOPS
    return _result(spec["name"], times, tokens, extra, cpu)


# ====================================================================== TRL worker
def run_trl(ws: Path, spec: dict, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    p = PRESETS[spec["preset"]]
    gpu = spec["preset"] == "gpu"
    tok = AutoTokenizer.from_pretrained(ws / "model")
    model = AutoModelForCausalLM.from_pretrained(ws / "model", dtype=getattr(torch, p["dtype"]),
                                                 attn_implementation="sdpa")
    kind = spec["kind"]
    rows = [json.loads(line) for line in open(ws / f"{spec['data']}-{'pref' if kind == 'dpo' else 'sft'}.jsonl")]
    common = dict(output_dir=str(out), per_device_train_batch_size=p["batch"], gradient_accumulation_steps=1,
                  max_steps=spec["warmup"] + spec["steps"], learning_rate=1e-5, lr_scheduler_type="constant",
                  adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, logging_steps=10**6, save_strategy="no",
                  report_to=[], disable_tqdm=True, seed=42, bf16=gpu, max_length=p["max_len"],
                  use_liger_kernel=spec.get("liger", False), dataloader_num_workers=0,
                  gradient_checkpointing=spec.get("ckpt", False),  # TRL's default is True: slower
                  use_cpu=not torch.cuda.is_available())
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common, padding_free=spec.get("padding_free", False), packing=spec.get("packing", False))
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    else:
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**common, precompute_ref_log_probs=spec.get("precompute", True), beta=0.1)
        t0 = time.perf_counter()
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        spec["setup_s"] = time.perf_counter() - t0

    counted: list[int] = []
    lens: list[int] = []
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        if "position_ids" in batch and "attention_mask" not in batch:  # padding-free: one row
            starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["position_ids"].shape[1]]
            seq = [b - a for a, b in zip(starts, starts[1:])]
        else:
            seq = batch["attention_mask"].sum(1).tolist()
        counted.append(sum(seq))
        lens.extend(seq)
        return batch

    trainer.data_collator = counting
    isolated = _sequences_kept_apart(trainer) if kind == "sft" and spec.get("packing") else None
    losses: list[float] = []

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.tokens, self.cpu, self.last, self.last_cpu = [], [], [], None, None

        def on_train_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            _sync()
            self.last, self.last_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            _sync()
            now, now_cpu = time.perf_counter(), time.process_time()
            if state.global_step > spec["warmup"]:
                self.times.append(now - self.last)
                self.cpu.append(now_cpu - self.last_cpu)
                self.tokens.append(counted[state.global_step - 1] if len(counted) >= state.global_step else 0)
            self.last, self.last_cpu = now, now_cpu

    timer = Timer()
    trainer.add_callback(timer)
    orig = trainer.compute_loss

    def compute_loss(*a, **kw):
        out = orig(*a, **kw)
        loss = out[0] if isinstance(out, tuple) else out
        losses.append(float(loss.detach()))
        return out

    trainer.compute_loss = compute_loss
    trainer.train()
    extra = {"first_loss": losses[0] if losses else None, "setup_s": spec.get("setup_s", 0.0),
             "isolated": isolated}
    if torch.cuda.is_available():
        fpt = _model_flops_per_token(ws, lens)
        extra["mfu"] = fpt * _best_window(timer.times, timer.tokens) / PEAK_FLOPS
    return _result(spec["name"], timer.times, timer.tokens, extra, timer.cpu)


def _sequences_kept_apart(trainer) -> bool:
    """Does TRL's padding-free row keep its sequences apart with this attention implementation?
    The second of two packed sequences must get the logits it gets alone."""
    import torch

    ds = trainer.train_dataset
    ids = [torch.tensor(ds[i]["input_ids"][:64]) for i in range(2)]
    model = trainer.model
    dev = next(model.parameters()).device
    row = torch.cat(ids)[None].to(dev)
    pos = torch.cat([torch.arange(len(x)) for x in ids])[None].to(dev)
    with torch.no_grad():
        packed = model(input_ids=row, position_ids=pos).logits[0, len(ids[0]):].float()
        alone = model(input_ids=ids[1][None].to(dev)).logits[0].float()
    return bool((packed - alone).abs().max() <= 1e-2 * alone.abs().max())


# ====================================================================== orchestration
def configs(preset: str, only: set[str] | None) -> list[dict]:
    p = PRESETS[preset]
    gpu = preset == "gpu"
    base = dict(preset=preset, warmup=p["warmup"], steps=p["steps"])
    specs = []
    for data in ("synthetic", "hh"):
        real = data == "hh"
        b = dict(base, data=data, framework="bipost")
        t = dict(base, data=data, framework="trl")
        specs += [dict(b, name=f"bipost-sft/{data}", kinds=["sft"])]
        if real:  # fixed lengths have no padding to drop
            specs += [dict(b, name=f"bipost-sft-padded/{data}", kinds=["sft"], packing=False)]
        specs += [dict(b, name=f"bipost-dpo/{data}", kinds=["dpo"])]
        if real:
            specs += [dict(b, name=f"bipost-dpo-online-ref/{data}", kinds=["dpo"], cache=False)]
        if real:
            specs += [dict(b, name=f"bipost-kd/{data}", kinds=["kd"]),
                      dict(b, name=f"bipost-kd-top32-cached/{data}", kinds=["kd"], kd_topk=32)]
        specs += [dict(t, name=f"trl-sft-padded/{data}", kind="sft")]
        if real or not gpu:
            specs += [dict(t, name=f"trl-sft-packed/{data}", kind="sft", packing=True)]
        specs += [dict(t, name=f"trl-dpo-precompute/{data}", kind="dpo")]
        if real:  # TRL's defaults (gradient checkpointing on): slower, less memory
            specs += [dict(t, name=f"trl-sft-packed-ckpt/{data}", kind="sft", packing=True, ckpt=True),
                      dict(t, name=f"trl-dpo-precompute-ckpt/{data}", kind="dpo", ckpt=True)]
        if gpu:
            specs += [dict(t, name=f"trl-sft-packed-liger/{data}", kind="sft", packing=True, liger=True),
                      dict(t, name=f"trl-dpo-precompute-liger/{data}", kind="dpo", liger=True)]
    # Schedules: same step budget, real data; ALRIGHT/MAXRIGHT/mix with the cached reference,
    # sequential as the classic recipe has it (its DPO stage's reference is the SFT stage's
    # result, which no cache can hold before training: online reference forwards).
    s = dict(base, data="hh", framework="bipost", warmup=1, steps=p["sched_steps"], kinds=["sft", "dpo"])
    specs += [
        dict(s, name="sched-sequential-online-ref", schedule="sequential", cache=False),
        dict(s, name="sched-sequential-cached", schedule="sequential"),
        dict(s, name="sched-alright", schedule="alright"),
        dict(s, name="sched-maxright", schedule="maxright"),
        dict(s, name="sched-mix", schedule="mix"),
    ]
    if gpu:  # last: compiling may take a while
        for data in ("synthetic", "hh"):
            for kind in ("sft", "dpo"):
                specs += [dict(base, data=data, framework="bipost", name=f"bipost-{kind}-compiled/{data}",
                               kinds=[kind], compile=True)]
        # TRL's packed "batch 8" on hh is 8 bins of max_len tokens (~4,000 tokens a step); bipost's
        # batch counts examples (~1,100 tokens). 28 hh examples hold about as many tokens as 8 bins.
        specs += [dict(base, data="hh", framework="bipost", name="bipost-sft-compiled-tokmatch/hh",
                       kinds=["sft"], compile=True, batch=28)]
    if only:
        specs = [sp for sp in specs if any(sp["name"].startswith(o) for o in only)]
    return specs


def check_equivalence(ws: Path, preset: str) -> list[str]:
    """On the preset's model and real data: packed (varlen kernel on GPU) and chunked / Liger
    log-probs against the padded full-logits path, losses and lm_head / first-layer gradients."""
    import torch

    from bipost.config import DataConfig
    from bipost.data import load_objective_data
    from bipost.kinds import get_kind, make_objective
    from bipost.modeling.attention import use_packed_attention
    from bipost.modeling.forward import Forward, ForwardOptions
    from bipost.models import compile_layers, load_tokenizer
    from transformers import AutoModelForCausalLM

    p = PRESETS[preset]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(str(ws / "model"))
    model = AutoModelForCausalLM.from_pretrained(ws / "model", dtype=getattr(torch, p["dtype"]),
                                                 attn_implementation="sdpa").to(dev)
    use_packed_attention(model)
    lines = []
    refs: dict = {}
    plan = [(kind, mode, packing, False) for kind in ("sft", "dpo")
            for mode, packing in (("plain", False), ("chunked", False), ("chunked", True), ("liger", True))]
    if dev == "cuda":  # last, once the layers are compiled (in place): model.compile's path
        plan += [(kind, "chunked", True, True) for kind in ("sft", "dpo")]
    for kind, mode, packing, compiled in plan:
        if mode == "liger" and not (dev == "cuda" and _has("liger_kernel")):
            continue
        if compiled and kind == "sft":
            compile_layers(model)
        data = load_objective_data(DataConfig(path=str(ws / f"hh-{'pref' if kind == 'dpo' else 'sft'}.jsonl"),
                                              max_len=p["max_len"]), get_kind(kind).examples, tok).train[:8]
        task = make_objective(kind, Forward(ForwardOptions(mode, compile=compiled)), packing)
        batch = task.collate(tok.pad_token_id)(data)
        if kind == "dpo":
            batch["ref_logps"] = torch.zeros(2 * len(data))
        batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
        model.zero_grad(set_to_none=True)
        out = task.loss(model, batch)
        out.losses.sum().backward()
        grads = torch.cat([model.get_output_embeddings().weight.grad.float().flatten(),
                           model.model.layers[0].mlp.down_proj.weight.grad.float().flatten()])
        cur = (out.losses.detach().float(), grads)
        if kind not in refs:
            refs[kind] = cur
            continue
        ref = refs[kind]
        dl = ((cur[0] - ref[0]).norm() / ref[0].norm()).item()
        dg = ((cur[1] - ref[1]).norm() / ref[1].norm()).item()
        lines.append(f"check {kind}: {mode}{' packed' if packing else ''}{' compiled' if compiled else ''} "
                     f"vs plain padded: loss rel err {dl:.2e}, grad rel err {dg:.2e}")
    del model
    return lines


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def worker(spec: dict, ws: Path, out: Path) -> dict:
    run_out = out / "runs" / spec["name"].replace("/", "-")
    if run_out.exists():
        import shutil

        shutil.rmtree(run_out)
    run_out.mkdir(parents=True)
    if spec["framework"] == "bipost":
        return run_bipost(ws, spec, run_out)
    return run_trl(ws, spec, run_out)


def fmt_table(results: list[dict], gpu: bool) -> str:
    by = {r["name"]: r for r in results if "error" not in r}
    lines = []
    mem_unit = "GiB" if gpu else "MiB RSS"
    head = f"| config | tokens/s | peak ({mem_unit}) |" + (" MFU |" if gpu else " tokens/CPU-s |") + " step s | note |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | error | | " + ("| " if gpu else "") + f"| {r['error'][:80]} |")
            continue
        mfu = f" {100 * r['mfu']:.1f}% |" if gpu and "mfu" in r else (" |" if gpu else
                                                                      f" {r.get('tokens_per_cpu_s', 0):,.0f} |")
        note = {True: "sequences kept apart", False: "SEQUENCES ATTEND ACROSS: excluded"}.get(r.get("isolated"), "")
        lines.append(f"| {r['name']} | {r['tokens_per_s']:,.0f} | {r['peak']:,.2f} |{mfu} "
                     f"{r['time'] / max(r['steps'], 1):.3f} | {note} |")
    # Ratios against TRL's best correct candidate.
    lines += ["", "| data | objective | bipost tokens/s | TRL best (fastest) | ratio | ratio per CPU-s | bipost peak "
                  "| TRL best's peak | peak ratio | TRL's lowest peak |", "|---|---|---|---|---|---|---|---|---|---|"]
    for data in ("synthetic", "hh"):
        for kind in ("sft", "dpo"):
            # bipost's fastest at the same batch: default (eager) or model.compile
            mine = [by[n] for n in (f"bipost-{kind}/{data}", f"bipost-{kind}-compiled/{data}") if n in by]
            cands = [r for n, r in by.items() if n.startswith(f"trl-{kind}") and n.endswith(f"/{data}")]
            ok = [c for c in cands if c.get("isolated") is not False]  # packing that mixes sequences: no
            if not mine or not ok:
                continue
            ours = max(mine, key=lambda c: c["tokens_per_s"])
            best = max(ok, key=lambda c: c["tokens_per_s"])
            cpu_ratio = (f"{ours['tokens_per_cpu_s'] / best['tokens_per_cpu_s']:.2f}x"
                         if ours.get("tokens_per_cpu_s") and best.get("tokens_per_cpu_s") else "")
            lines.append(f"| {data} | {kind} | {ours['tokens_per_s']:,.0f} ({ours['name'].split('/')[0]}) | "
                         f"{best['tokens_per_s']:,.0f} "
                         f"({best['name'].split('/')[0]}) | {ours['tokens_per_s'] / best['tokens_per_s']:.2f}x | {cpu_ratio} | "
                         f"{ours['peak']:,.2f} | {best['peak']:,.2f} | {ours['peak'] / best['peak']:.2f} | "
                         f"{min(c['peak'] for c in ok):,.2f} |")
    sched = [r for r in results if r["name"].startswith("sched-") and "error" not in r]
    if sched:
        seq = by.get("sched-sequential-online-ref")
        lines += ["", "| schedule (same steps, hh) | wall s (timed steps) | vs sequential | CPU s | vs sequential "
                  "| setup s (incl. reference cache) |", "|---|---|---|---|---|---|"]
        for r in sched:
            rel = f"{r['time'] / seq['time']:.2f}x" if seq else ""
            cpu = r["tokens"] / r["tokens_per_cpu_s"] if r.get("tokens_per_cpu_s") else None
            seq_cpu = seq["tokens"] / seq["tokens_per_cpu_s"] if seq and seq.get("tokens_per_cpu_s") else None
            cpu_s = f"{cpu:.2f}" if cpu else ""
            cpu_rel = f"{cpu / seq_cpu:.2f}x" if cpu and seq_cpu else ""
            lines.append(f"| {r['name'][6:]} | {r['time']:.2f} | {rel} | {cpu_s} | {cpu_rel} | {r.get('setup_s', 0):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="the Qwen2-0.5B-shaped GPU preset")
    ap.add_argument("--only", default="", help="comma-separated config name prefixes")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per config (default: the preset's)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per config")
    ap.add_argument("--inproc", action="store_true",
                    help="run every config in this process (saves start-up time; but TRL's use_liger_kernel "
                         "patches transformers' classes for every later config of the process)")
    ap.add_argument("--hh", default=str(HH), help="the HH-RLHF preference file")
    a = ap.parse_args(argv)
    out = Path(a.out)
    preset = "gpu" if a.gpu else "cpu"
    if a.worker:
        spec = json.loads(a.worker)
        try:
            res = worker(spec, out / f"work-{spec['preset']}", out)
        except Exception as err:  # reported in the table, the other configs still run
            import traceback

            traceback.print_exc()
            res = {"name": spec["name"], "error": f"{type(err).__name__}: {err}"}
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    import torch
    import transformers

    # glibc returns freed large blocks to the OS and page-faults them back on the next step; on
    # VMs where faults are slow that dominates a CPU step. Same setting for every framework.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**32))
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(2**36))
    # One intra-op thread per worker on CPU: on a shared machine a second OpenMP thread that is
    # descheduled stalls every parallel region at its barrier (10x slower steps, measured here).
    if preset == "cpu":
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    else:  # variable-length batches: grow segments instead of a cudaMalloc per new shape
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    ws = build_workspace(preset, out, Path(a.hh))
    checks = check_equivalence(ws, preset) if preset == "gpu" else []
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the workers need the memory, not this process
    for line in checks:
        print(line, flush=True)
    have_trl = trl_available()
    specs = [s for s in configs(preset, set(filter(None, a.only.split(","))))
             if have_trl or s["framework"] != "trl"]
    if a.steps:
        for s in specs:
            s["steps"] = a.steps
    results = []
    t_all = time.perf_counter()
    for spec in specs:
        t0 = time.perf_counter()
        if a.inproc:
            import gc

            try:
                res = worker(spec, ws, out)
            except Exception as err:
                import traceback

                traceback.print_exc()
                res = {"name": spec["name"], "error": f"{type(err).__name__}: {err}"}
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # between configs, so each one's peak is its own
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(True)  # TRL (bf16 autocast) and bipost set it differently
            results.append(res)
            (out / f"results-{preset}.json").write_text(json.dumps({"partial": True, "results": results}))
            msg = res.get("error") or f"{res['tokens_per_s']:,.0f} tok/s, peak {res['peak']:,.2f} {res['peak_unit']}"
            print(f"[{time.perf_counter() - t0:6.1f}s] {spec['name']}: {msg}", flush=True)
            continue
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
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
        # After every config, as --inproc does: a run stopped at a device-time limit keeps what it measured.
        (out / f"results-{preset}.json").write_text(json.dumps({"partial": True, "results": results}))
        msg = res.get("error") or f"{res['tokens_per_s']:,.0f} tok/s, peak {res['peak']:,.2f} {res['peak_unit']}"
        print(f"[{time.perf_counter() - t0:6.1f}s] {spec['name']}: {msg}", flush=True)
    trl_v = __import__("trl").__version__ if have_trl else "not installed"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    header = (f"device: {device}; torch {torch.__version__}, transformers {transformers.__version__}, "
              f"trl {trl_v}; preset {preset} {PRESETS[preset]}; {time.strftime('%Y-%m-%d %H:%M')}; "
              f"total {time.perf_counter() - t_all:.0f}s")
    table = "\n".join(checks + [""] if checks else []) + fmt_table(results, preset == "gpu")
    (out / f"results-{preset}.json").write_text(json.dumps({"header": header, "results": results}, indent=1))
    (out / f"table-{preset}.md").write_text(header + "\n\n" + table + "\n")
    print("\n" + header + "\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

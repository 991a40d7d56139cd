"""GPU benchmark of the sharded engines on a real-size model shape.

A Llama-3-8B-shaped model (random init: no download), LoRA r=16 on all linear layers, bf16,
gradient checkpointing, SFT + DPO mixed every step (the DPO reference is the policy with its
adapter disabled), sequences of ``--seq`` tokens, through the shipped accelerate configs::

    accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml --num_processes 1 \\
        bench/distributed_gpu.py --out bench/out/zero3
    accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 1 \\
        bench/distributed_gpu.py --out bench/out/fsdp2
    python bench/distributed_gpu.py --tiny --out bench/out/tiny   # 1-GPU bf16 run of the tiny test model

The model is built by ``AutoModelForCausalLM.from_config`` in place of bipost's loader (it is the
only thing patched): under ZeRO-3 it is constructed partitioned (``zero.Init``), otherwise on
the GPU. Everything else is the ordinary ``Trainer``. Rank 0 writes ``<out>/result.json``: peak
GPU memory (allocated and reserved), tokens/s over the steps after the first (tokens = non-pad
tokens of every policy forward, DPO counting chosen and rejected), step times, versions.
``--set key=value`` passes extra config overrides (e.g. ``dist.backend=fsdp2`` under torchrun);
``--scale smoke`` shrinks the model to a few MB to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

SHAPES = {
    # meta-llama/Meta-Llama-3-8B's config.json
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
               rms_norm_eps=1e-5),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, rope_theta=500000.0, max_position_embeddings=2048,
                  rms_norm_eps=1e-5),
}
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega red green blue cyan magenta yellow black white").split()


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def build_workspace(root: Path, shape: str, seq: int) -> Path:
    """Tokenizer + config-only model folder, and SFT / preference rows longer than ``seq`` tokens
    (truncated to exactly ``seq`` by the data pipeline)."""
    from transformers import LlamaConfig

    from bipost.demo.data import write_jsonl
    from bipost.tiny import build_tokenizer

    rng = random.Random(0)
    sft = [{"input": text(rng, 16), "output": text(rng, seq)} for _ in range(64)]
    pref = [{"prompt": text(rng, 16), "chosen": text(rng, seq), "rejected": text(rng, seq)} for _ in range(64)]
    write_jsonl(root / "sft.jsonl", sft)
    write_jsonl(root / "pref.jsonl", pref)
    tok = build_tokenizer([r["input"] + " " + r["output"] for r in sft[:16]], vocab_size=512)  # a word ~ a token
    model_dir = root / "model"
    tok.save_pretrained(model_dir)
    LlamaConfig(**SHAPES[shape], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, tie_word_embeddings=False).save_pretrained(model_dir)
    return root


def random_init_loader():
    """bipost.models.load_causal_lm, with the weights drawn at random instead of read from disk."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    from bipost.models import resolve_attn, resolve_dtype

    def load(path, cfg, frozen=False):
        config = AutoConfig.from_pretrained(path)
        kwargs = dict(dtype=resolve_dtype(cfg.dtype), attn_implementation=resolve_attn(cfg.attn_implementation))
        t0 = time.perf_counter()
        if is_deepspeed_zero3_enabled() or not torch.cuda.is_available():
            model = AutoModelForCausalLM.from_config(config, **kwargs)  # ZeRO-3: built partitioned
        else:
            with torch.device("cuda"):
                model = AutoModelForCausalLM.from_config(config, **kwargs)
        print(f"[bench] built {config.num_hidden_layers}-layer model in {time.perf_counter() - t0:.1f}s", flush=True)
        if frozen:
            model.eval().requires_grad_(False)
        return model

    return load


def versions() -> dict:
    import accelerate
    import peft
    import torch
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
         "accelerate": accelerate.__version__, "peft": peft.__version__}
    try:
        import deepspeed

        v["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        v["gpu"] = torch.cuda.get_device_name(0)
        v["cuda"] = torch.version.cuda
    return v


def run_tiny(work: Path) -> dict:
    """One-GPU bf16 run of the tiny workspace the tests use: the loss must go down."""
    import torch
    from safetensors.torch import load_file

    from bipost.configio import load_config
    from bipost.demo import data as D
    from bipost.tiny import save_tiny
    from bipost.run import train

    sft = D.sft_rows(256, task="reverse", seed=0)
    D.write_jsonl(work / "ws" / "sft.jsonl", sft)
    save_tiny(work / "ws" / "model", D.corpus([sft]), vocab_size=200, hidden_size=64, num_heads=4)
    cfg = load_config(overrides=[
        f"model.path={work / 'ws' / 'model'}", "model.dtype=bfloat16", "objectives.0.kind=sft",
        f"objectives.0.data.path={work / 'ws' / 'sft.jsonl'}", "objectives.0.data.max_len=64",
        "train.max_steps=60", "train.batch_size=32", "train.micro_batch_size=16", "optim.lr=3e-3",
        "train.progress=false", f"train.output_dir={work / 'run'}",
    ])
    result = train(cfg)
    first, last = result.train_losses[0]["sft"], result.train_losses[-1]["sft"]
    dtypes = sorted({str(t.dtype) for t in load_file(result.final_dir / "model.safetensors").values()})
    return {"device": str(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "cpu",
            "first_loss": first, "last_loss": last, "trains": last < 0.7 * first, "saved_dtypes": dtypes,
            "seconds": result.wall_time}


def run_big(work: Path, shape: str, seq: int, steps: int, lora_rank: int, extra: list[str]) -> dict | None:
    import torch

    import bipost.models
    from bipost.configio import load_config
    from bipost.engine import Engine
    from bipost.run import build_trainer
    from bipost.train.metrics import read_metrics

    ws = work / "ws"
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        build_workspace(ws, shape, seq)
    bipost.models.load_causal_lm = random_init_loader()
    cfg = load_config(overrides=[
        f"model.path={ws / 'model'}", "model.dtype=bfloat16", "model.attn_implementation=sdpa",
        "model.gradient_checkpointing=true", f"model.lora.rank={lora_rank}", f"model.lora.alpha={2 * lora_rank}",
        "objectives.0.kind=sft", f"objectives.0.data.path={ws / 'sft.jsonl'}", f"objectives.0.data.max_len={seq}",
        "objectives.1.kind=dpo", f"objectives.1.data.path={ws / 'pref.jsonl'}", f"objectives.1.data.max_len={seq}",
        "schedule.name=mix", f"train.max_steps={steps}", "train.batch_size=4", "train.micro_batch_size=2",
        "optim.lr=1e-4", "train.progress=false", f"train.output_dir={work / 'run'}", *extra,
    ])
    engine = Engine.for_run(cfg)
    engine.barrier()  # rank 0 wrote the workspace
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer = build_trainer(cfg, engine)
    setup_s = time.perf_counter() - t0
    result = trainer.train()
    if not engine.is_main:
        return None
    steps_rec = [r for r in read_metrics(result.output_dir / "metrics.jsonl") if r.get("kind", "train") == "train"]
    timed = steps_rec[1:]  # the first step includes one-time work (allocator warm-up, kernels)
    secs = [r["tokens"] / r["tokens_per_s"] for r in timed]
    gib = 2 ** 30
    return {
        "backend": engine.backend, "zero_stage": engine.zero_stage, "world_size": engine.world_size,
        "mixed_precision": engine.acc.mixed_precision, "shape": shape, "seq": seq, "steps": steps,
        "lora_rank": lora_rank, "tokens_per_step": timed[0]["tokens"] if timed else None,
        "tokens_per_s": sum(r["tokens"] for r in timed) / sum(secs) if timed else None,
        "step_seconds": [round(s, 3) for s in secs],
        "losses": [{k: v for k, v in r.items() if k.startswith("loss/")} for r in steps_rec],
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / gib if torch.cuda.is_available() else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / gib if torch.cuda.is_available() else None,
        "setup_seconds": setup_s,
        "saved": sorted(p.name for p in result.final_dir.iterdir()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="where result.json goes")
    p.add_argument("--work", type=Path, help="workspace and run folder (default: --out)")
    p.add_argument("--tiny", action="store_true", help="one-GPU bf16 run of the tiny test model instead")
    p.add_argument("--scale", choices=sorted(SHAPES), default="8b")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence (SFT: per row; DPO: per response)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--set", nargs="*", default=[], help="extra key=value config overrides")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bipost.cli.common import finish_distributed, setup_process

    setup_process()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out
    t0 = time.perf_counter()
    res = run_tiny(work) if args.tiny else run_big(work, args.scale, args.seq, args.steps, args.lora_rank, args.set)
    if res is not None:
        res.update(versions=versions(), wall_seconds=time.perf_counter() - t0,
                   command=" ".join(sys.argv), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
        (args.out / "result.json").write_text(json.dumps(res, indent=1))
        print(json.dumps(res, indent=1), flush=True)
    finish_distributed(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

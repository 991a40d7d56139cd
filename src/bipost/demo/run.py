"""The demo: tiny model + tokenizer built from scratch, synthetic data, SFT then DPO, through the
same config/loader/loop a hub model takes (the model is loaded back from disk by path)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from bipost.configio import load_config
import bipost.demo.data as D
from bipost.tiny import save_tiny
from bipost.run import train


def exact_match(model_dir: Path, rows: list[dict], template: str = "User: {}\nAssistant: ") -> float:
    """Greedy-decode each prompt (batched, ``bipost.generation``); the fraction whose answer equals
    the reference (``bipost.evaluation.exact_match``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bipost.evaluation import exact_match as same
    from bipost.generation import generate

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompts = [tok(template.format(r["input"])).input_ids for r in rows]
    out = generate(model, prompts, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=16)
    answers = [tok.decode(ids, skip_special_tokens=True) for ids in out.completion_ids]
    return sum(same(a, r["output"]) for a, r in zip(answers, rows)) / len(rows)


def run_demo(out: str | Path = "demo_out", quick: bool = False) -> dict:
    t0 = time.time()
    # A hidden-64 model gains nothing from a second CPU thread, and a descheduled OpenMP thread
    # stalls every parallel region when the machine is busy (10x slower steps were measured).
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    sft_train, sft_eval = D.sft_rows(2000, seed=0), D.sft_rows(100, seed=100)
    pref = D.preference_rows(1200, seed=1)
    D.write_jsonl(out / "data/sft.jsonl", sft_train)
    D.write_jsonl(out / "data/sft_heldout.jsonl", sft_eval)
    D.write_jsonl(out / "data/pref.jsonl", pref)
    base = save_tiny(out / "base_model", D.corpus([sft_train, pref]), vocab_size=256)
    print(f"[demo] built a tiny Llama-style model + BPE tokenizer from scratch: {base}")
    print(f"[demo] data: {len(sft_train)} SFT rows ('reverse: a b c' -> 'c b a'), {len(pref)} preference pairs "
          f"(right answer vs corrupted) in {out / 'data'}")

    sft_steps, dpo_steps = (40, 10) if quick else (220, 150)
    sft_cfg = load_config(overrides=[
        f"model.path={base}",
        "objectives.0.kind=sft", f"objectives.0.data.path={out / 'data/sft.jsonl'}",
        "objectives.0.data.eval_fraction=0.05", "objectives.0.data.max_len=64",
        f"train.max_steps={sft_steps}", "train.batch_size=32", "train.micro_batch_size=32",
        f"train.eval_steps={sft_steps // 4}", f"train.output_dir={out / 'sft'}",
        "optim.lr=3e-3", "optim.scheduler=cosine", "optim.warmup_steps=20",
    ])
    sft = train(sft_cfg)
    em_base = exact_match(base, sft_eval[:50])
    em_sft = exact_match(sft.final_dir, sft_eval[:50])
    print(f"[demo] SFT: held-out loss {sft.eval_history[0]['sft']:.3f} -> {sft.eval_history[-1]['sft']:.3f}; "
          f"exact-match on 50 unseen prompts {em_base:.0%} -> {em_sft:.0%}")

    dpo_cfg = load_config(overrides=[
        f"model.path={sft.final_dir}",
        "objectives.0.kind=dpo", f"objectives.0.data.path={out / 'data/pref.jsonl'}",
        "objectives.0.data.eval_fraction=0.1", "objectives.0.data.max_len=64", "objectives.0.beta=0.1",
        f"train.max_steps={dpo_steps}", "train.batch_size=32", "train.micro_batch_size=32",
        f"train.eval_steps={max(1, dpo_steps // 4)}", f"train.output_dir={out / 'dpo'}",
        "optim.lr=5e-4", "optim.warmup_steps=10",
    ])
    dpo = train(dpo_cfg)
    em_dpo = exact_match(dpo.final_dir, sft_eval[:50])
    from bipost.train.metrics import read_metrics

    last = [r for r in read_metrics(dpo.output_dir / "metrics.jsonl") if r.get("kind", "train") == "train"][-1]
    print(f"[demo] DPO (reference = the SFT model): held-out loss {dpo.eval_history[0]['dpo']:.3f} -> "
          f"{dpo.eval_history[-1]['dpo']:.3f}; last-step reward accuracy {last.get('dpo/accuracy', 0):.0%}, "
          f"margin {last.get('dpo/margin', 0):.3f}; exact-match {em_dpo:.0%}")
    summary = {"em_base": em_base, "em_sft": em_sft, "em_dpo": em_dpo,
               "sft_eval": sft.eval_history, "dpo_eval": dpo.eval_history}
    from bipost.demo.compare import run_compare_demo

    summary["compare"] = run_compare_demo(out / "compare", sft.final_dir, quick=quick)
    print(f"[demo] done in {time.time() - t0:.0f}s. Outputs: {out}/sft, {out}/dpo and {out}/compare (config.yaml, "
          f"metrics.jsonl, final/ loadable with transformers)")
    return summary

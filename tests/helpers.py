"""Shared builders for training tests: a tiny model saved to disk and small synthetic datasets."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from types import SimpleNamespace

from bipost.configio import load_config
from bipost.demo import data as D
from bipost.modeling.forward import Forward, positions
from bipost.objectives.segments import segment_count, segment_sum
from bipost.tiny import save_tiny


@functools.lru_cache(maxsize=None)
def workspace() -> Path:
    """One tiny model + datasets per test process (built in ~1 s, reused by every test)."""
    root = Path(tempfile.mkdtemp(prefix="bipost-test-"))
    sft = D.sft_rows(64, task="reverse", seed=0)
    copy = D.sft_rows(64, task="copy", seed=3)
    pref = D.preference_rows(64, seed=1)
    D.write_jsonl(root / "sft.jsonl", sft)
    D.write_jsonl(root / "copy.jsonl", copy)
    D.write_jsonl(root / "pref.jsonl", pref)
    D.write_jsonl(root / "grpo.jsonl", [{"prompt": f"User: {r['input']}\nAssistant: ", "answer": r["output"]}
                                        for r in copy[:32]])
    save_tiny(root / "model", D.corpus([sft, copy, pref]), vocab_size=200, hidden_size=32, num_heads=2)
    save_tiny(root / "teacher", D.corpus([sft, copy, pref]), vocab_size=200, hidden_size=32, num_heads=2, seed=7)
    return root


def config(out: Path, *overrides: str, kinds: tuple[str, ...] = ("sft",)):
    """A run config on the tiny workspace; ``kinds`` lists the objectives in order."""
    ws = workspace()
    data = {"sft": ws / "sft.jsonl", "dpo": ws / "pref.jsonl", "kd": ws / "copy.jsonl", "simpo": ws / "pref.jsonl",
            "orpo": ws / "pref.jsonl", "kto": ws / "pref.jsonl", "grpo": ws / "grpo.jsonl"}
    base = [f"model.path={ws / 'model'}", f"train.output_dir={out}", "train.progress=false",
            "train.max_steps=4", "train.batch_size=8", "train.micro_batch_size=8",
            "optim.lr=1e-3"]
    for i, k in enumerate(kinds):
        base += [f"objectives.{i}.kind={k}", f"objectives.{i}.data.path={data[k]}",
                 f"objectives.{i}.data.max_len=64"]
        if k == "kd":
            base.append(f"objectives.{i}.teacher={ws / 'teacher'}")
        if k == "grpo":
            base += grpo_fields(i)
    if len(kinds) > 1:
        base.append("schedule.name=mix")
    return load_config(overrides=base + list(overrides))



def objective(kind: str, opts=None, packing: bool = False, frozen=None, **fields):
    """``make_objective`` with forward options ``opts`` (``ForwardOptions``)."""
    from bipost.kinds import make_objective
    from bipost.modeling.forward import Forward

    return make_objective(kind, Forward(opts), packing, frozen, **fields)


def grpo_fields(i: int) -> list[str]:
    """A small grpo objective ``i`` on the workspace's copy prompts: 4 completions of 6 tokens each,
    scored by exact match with the answer and :func:`letter_reward` (dense, so groups differ)."""
    return [f"objectives.{i}.num_generations=4", f"objectives.{i}.max_new_tokens=6",
            f"objectives.{i}.data.max_len=32",
            f"objectives.{i}.rewards.0.function=exact_match", f"objectives.{i}.rewards.0.args.column=answer",
            f"objectives.{i}.rewards.1.function=helpers:letter_reward", f"objectives.{i}.rewards.1.weight=0.5"]


def letter_reward(prompts, completions, **columns):
    """A dense test reward: the fraction of a completion's characters that are task letters or
    spaces (a random model's samples differ in it, so every group has a signal)."""
    return [sum(ch in D.LETTERS + " " for ch in c) / max(len(c), 1) for c in completions]


def failing_reward(prompts, completions, **columns):
    """A reward function that fails (on rank ``FAIL_RANK`` only, when that variable is set)."""
    import os

    rank = os.environ.get("FAIL_RANK")
    if rank is None or os.environ.get("RANK", "0") == rank:
        return [1.0 / 0 for _ in completions]
    return [0.0 for _ in completions]


# A fake model side for hand-derived values through a kind: the "models" are scales, and every
# response token ``t`` has log-prob ``-t / scale`` (policy 10, reference 8).
POLICY, REFERENCE = SimpleNamespace(scale=10.0), SimpleNamespace(scale=8.0)
EOS = 2


class TokenLogps(Forward):
    """Summed log-probs without a model: each response token ``t`` has log-prob ``-t / model.scale``."""

    def sequence_logps(self, model, batch, num_seqs):
        pos = positions(batch, num_seqs)
        logps = -pos.target.float() / model.scale
        return segment_sum(logps, pos.seq, num_seqs), segment_count(pos.seq, num_seqs)

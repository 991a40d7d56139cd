"""Shared builders for training tests: a tiny model saved to disk and small synthetic datasets."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from bipost.configio import load_config
from bipost.demo import data as D
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
    save_tiny(root / "model", D.corpus([sft, copy, pref]), vocab_size=200, hidden_size=32, num_heads=2)
    save_tiny(root / "teacher", D.corpus([sft, copy, pref]), vocab_size=200, hidden_size=32, num_heads=2, seed=7)
    return root


def config(out: Path, *overrides: str, kinds: tuple[str, ...] = ("sft",)):
    """A run config on the tiny workspace; ``kinds`` lists the objectives in order."""
    ws = workspace()
    data = {"sft": ws / "sft.jsonl", "dpo": ws / "pref.jsonl", "kd": ws / "copy.jsonl", "simpo": ws / "pref.jsonl",
            "orpo": ws / "pref.jsonl", "kto": ws / "pref.jsonl"}
    base = [f"model.path={ws / 'model'}", f"train.output_dir={out}", "train.progress=false",
            "train.max_steps=4", "train.batch_size=8", "train.micro_batch_size=8",
            "optim.lr=1e-3"]
    for i, k in enumerate(kinds):
        base += [f"objectives.{i}.kind={k}", f"objectives.{i}.data.path={data[k]}",
                 f"objectives.{i}.data.max_len=64"]
        if k == "kd":
            base.append(f"objectives.{i}.teacher={ws / 'teacher'}")
    if len(kinds) > 1:
        base.append("schedule.name=mix")
    return load_config(overrides=base + list(overrides))



def objective(kind: str, opts=None, packing: bool = False, frozen=None, **fields):
    """``make_objective`` with forward options ``opts`` (``ForwardOptions``)."""
    from bipost.kinds import make_objective
    from bipost.modeling.forward import Forward

    return make_objective(kind, Forward(opts), packing, frozen, **fields)

"""Pinned behaviour: the exact per-step losses of short runs, recorded once and compared forever.

Every schedule x objective pair, padded and packed, full fine-tuning and LoRA, plus the special paths
(cached reference, top-k KD online and cached, IPO + NLL, reverse KL / JSD, per-micro-step ALRIGHT,
the bilevel selector) and the SimPO, ORPO and KTO kinds. A refactor of the loop, the objectives or the
data layer must reproduce them.

The numbers live in ``pinned_losses.json`` beside this file. After a change that is *meant* to change
them, re-record with ``BIPOST_RECORD_PINNED=1 pytest tests/test_pinned_losses.py`` and say why in the
commit message.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from bipost.run import train

from helpers import config

PINNED = Path(__file__).with_name("pinned_losses.json")
RECORD = os.environ.get("BIPOST_RECORD_PINNED") == "1"

COMMON = ("train.max_steps=3", "train.batch_size=8", "train.micro_batch_size=4",
          "objectives.0.data.eval_fraction=0.125", "objectives.0.data.max_eval_samples=5", "train.eval_batch_size=2")
VARIANTS = {
    "padded-full": (),
    "padded-lora": ("model.lora.rank=4",),
    "packed-full": ("train.packing=true",),
    "packed-lora": ("train.packing=true", "model.lora.rank=4"),
}
PAIRS = [("sft", "dpo"), ("sft", "kd"), ("dpo", "kd")]
SCHEDULES = ["sequential", "mix", "alright", "maxright"]


def _cases() -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    cases: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    for variant, extra in VARIANTS.items():
        for kind in ("sft", "dpo", "kd"):
            cases[f"single-{kind}-{variant}"] = ((kind,), extra)
        for sched in SCHEDULES:
            for pair in PAIRS:
                cases[f"{sched}-{'+'.join(pair)}-{variant}"] = (pair, extra + (f"schedule.name={sched}",
                                                                              "schedule.max_eval_steps=2"))
    special = {
        "dpo-cache-reference": (("dpo",), ("objectives.0.cache_reference=true",)),
        "dpo-ipo-nll": (("dpo",), ("objectives.0.loss_type=ipo", "objectives.0.nll_coef=0.5")),
        "dpo-cdpo": (("dpo",), ("objectives.0.label_smoothing=0.2", "objectives.0.beta=0.3")),
        "kd-reverse": (("kd",), ("objectives.0.kd_loss=reverse", "objectives.0.temperature=2.0")),
        "kd-jsd": (("kd",), ("objectives.0.kd_loss=jsd", "objectives.0.jsd_beta=0.3")),
        "kd-topk-online": (("kd",), ("objectives.0.kd_topk=16",)),
        "kd-topk-cached-packed": (("kd",), ("objectives.0.kd_topk=16", "objectives.0.cache_teacher=true",
                                            "train.packing=true")),
        "alright-per-micro-step": (("sft", "dpo"), ("schedule.name=alright", "schedule.per_micro_step=true",
                                                    "train.micro_batch_size=2")),
        "alright-three": (("sft", "dpo", "kd"), ("schedule.name=alright", "objectives.1.weight=2")),
        "bilevel-selector-sft": (("sft", "sft"), ("selector.enabled=true", "schedule.name=bilevel",
                                                  "schedule.lambda_decay=0.2", "selector.lr=0.1")),
        "bilevel-selector-dpo-lora": (("sft", "dpo"), ("selector.enabled=true", "schedule.name=bilevel",
                                                       "model.lora.rank=4", "selector.lr=0.1")),
        "alright-sft+simpo": (("sft", "simpo"), ("schedule.name=alright",)),
        "orpo-packed": (("orpo",), ("train.packing=true",)),
        "mix-kto+sft-lora": (("kto", "sft"), ("schedule.name=mix", "model.lora.rank=4")),
    }
    cases.update(special)
    return cases


CASES = _cases()


def run_case(tmp_path: Path, name: str) -> dict:
    kinds, extra = CASES[name]
    cfg = config(tmp_path / name, *COMMON, *extra, kinds=kinds)
    result = train(cfg)
    return {"train": result.train_losses, "eval": result.eval_history}


def _load() -> dict:
    return json.loads(PINNED.read_text()) if PINNED.exists() else {}


@pytest.mark.parametrize("name", list(CASES))
def test_losses_are_pinned(tmp_path, name):
    got = run_case(tmp_path, name)
    if RECORD:
        table = _load()
        table[name] = got
        PINNED.write_text(json.dumps(dict(sorted(table.items())), indent=1) + "\n")
        return
    want = _load().get(name)
    assert want is not None, f"no pinned losses for {name}: record them (see the module docstring)"
    assert [s["ran"] for s in got["train"]] == [s["ran"] for s in want["train"]]
    for g, w in zip(got["train"] + got["eval"], want["train"] + want["eval"]):
        assert g.keys() == w.keys()
        keys = sorted(k for k in w if k not in ("step", "ran"))
        torch.testing.assert_close(torch.tensor([g[k] for k in keys], dtype=torch.float64),
                                   torch.tensor([w[k] for k in keys], dtype=torch.float64), rtol=1e-5, atol=1e-6)

"""Cached DPO reference log-probs (bipost/example_cache.py through kinds/dpo.py): cached ≡ online,
stale caches are rebuilt, and a DPO run with objectives.N.cache_reference keeps no reference model."""

from __future__ import annotations

import gc
import logging

import torch
from torch.testing import assert_close

from helpers import config, workspace


def test_cached_training_equals_online_reference(tmp_path):
    """DPO through the loop: cached reference log-probs give the online run's losses (full
    fine-tuning: the reference is the policy's initial weights), packed and padded."""
    from bipost.run import build_trainer, train

    online = train(config(tmp_path / "online", "train.max_steps=2", kinds=("dpo",)))
    for packing in ("false", "true"):
        cfg = config(tmp_path / f"cached-{packing}", "train.max_steps=2", "objectives.0.cache_reference=true",
                     f"train.packing={packing}", kinds=("dpo",))
        cached = build_trainer(cfg).train()
        assert (tmp_path / f"cached-{packing}" / "cache" / "ref-dpo.pt").exists()
        a = torch.tensor([r["dpo"] for r in online.train_losses])
        b = torch.tensor([r["dpo"] for r in cached.train_losses])
        assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert b[0].item() == __import__("pytest").approx(0.6931472, abs=1e-5)  # policy == reference


def test_cached_values_equal_online_reference_logps(tmp_path):
    """The cache holds exactly the reference model's summed log-probs of each pair."""
    from bipost.run import build_trainer

    cfg = config(tmp_path / "r", "objectives.0.cache_reference=true",
                 f"objectives.0.reference={workspace() / 'teacher'}", kinds=("dpo",))
    trainer = build_trainer(cfg)
    run = trainer.runs["dpo"]
    assert run.objective.reference is None and run.objective.ref_cache is not None
    from bipost.data import collate_pref
    from bipost.models import load_causal_lm
    from bipost.objectives import sequence_logprobs

    ref = load_causal_lm(str(workspace() / "teacher"), cfg.model, frozen=True)
    ex = run.train[:5]
    batch = collate_pref(ex, trainer.tokenizer.pad_token_id)
    with torch.no_grad():
        sums, _ = sequence_logprobs(ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                    batch["labels"])
    cached = run.objective.ref_cache.rows(ex)["logps"]  # [n, 2]: chosen, rejected
    assert_close(cached.t().reshape(-1), sums, rtol=1e-5, atol=1e-5)
    first = run.objective.ref_cache.rows([run.train[i] for i in run.stream.indices(0)])["logps"]
    assert_close(run.stream.next()["ref_logps"], first.t().reshape(-1))


def test_cache_key_follows_data_model_and_max_len(tmp_path, caplog):
    """Through the run: a second run reuses the cache; changing max_len or the reference's files
    rebuilds it."""
    from bipost.run import build_trainer

    common = ["objectives.0.cache_reference=true", f"train.cache_dir={tmp_path / 'cache'}"]
    with caplog.at_level(logging.INFO, logger="bipost"):
        build_trainer(config(tmp_path / "a", *common, kinds=("dpo",)))
        assert "computing reference log-probs" in caplog.text
        caplog.clear()
        build_trainer(config(tmp_path / "b", *common, kinds=("dpo",)))
        assert "reference log-probs of" in caplog.text and "computing" not in caplog.text
        caplog.clear()
        build_trainer(config(tmp_path / "c", *common, "objectives.0.data.max_len=48", kinds=("dpo",)))
        assert "stale (changed: max_len)" in caplog.text  # the tiny rows all fit in 48 tokens
        caplog.clear()
        build_trainer(config(tmp_path / "d", *common, "objectives.0.data.max_len=48",
                       f"objectives.0.reference={workspace() / 'teacher'}", kinds=("dpo",)))
        assert "stale (changed: reference, reference_files)" in caplog.text


def test_dpo_run_with_cache_keeps_no_reference_model(tmp_path):
    """ALRIGHT with SFT + DPO and a cached reference: the only causal LM alive is the policy."""
    from transformers import PreTrainedModel

    from bipost.run import build_trainer

    trainer = build_trainer(config(tmp_path / "r", "schedule.name=alright", "objectives.1.cache_reference=true",
                             "train.max_steps=2", kinds=("sft", "dpo")))
    trainer.train()
    gc.collect()
    models = [o for o in gc.get_objects() if PreTrainedModel in type(o).__mro__]
    inner = trainer.engine.unwrap(trainer.model)
    alive = [m for m in models if m is not inner and not any(m is c for c in inner.modules())]
    assert trainer.runs["dpo"].objective.reference is None
    assert alive == [], f"models kept besides the policy: {[type(m).__name__ for m in alive]}"

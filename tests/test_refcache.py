"""Cached reference log-probs (train/refcache.py): cached ≡ online, stale caches are rebuilt, and a
DPO run with objectives.N.cache_reference keeps no reference model in memory."""

from __future__ import annotations

import gc
import logging

import torch
from torch.testing import assert_close

from bipost.data.types import PrefExample
from bipost.train.refcache import ReferenceLogps, load_or_build

from helpers import config, workspace


def test_lookup_is_chosen_then_rejected_by_content():
    """Two examples -> [c_0, c_1, r_0, r_1]; an example with equal tokens but another row id has
    the same values (they depend on the tokens only)."""
    a, b = PrefExample(0, (1,), (2,), (3,)), PrefExample(1, (4,), (5,), (6,))
    cache = ReferenceLogps.of([a, b], torch.tensor([[-1.0, -2.0], [-3.0, -4.0]]))
    assert cache.lookup([a, b]).tolist() == [-1.0, -3.0, -2.0, -4.0]
    assert cache.lookup([PrefExample(9, (4,), (5,), (6,))]).tolist() == [-3.0, -4.0]


def test_fingerprint_is_unchanged_and_the_same_for_stored_examples():
    """``data_fingerprint`` hashes, per id sequence, its length (4 bytes little-endian) and its ids
    as int64 -- the bytes the tuple version hashed with ``array("q", ...)``, so caches written
    before the token store stay valid. An example read from a store (uint16 numpy views) hashes
    and looks up like the same tokens in tuples."""
    import hashlib
    from array import array

    import numpy as np

    from bipost.train.refcache import data_fingerprint

    tuples = [PrefExample(0, (1, 500), (2,), (60000, 3)), PrefExample(1, (), (5,), (6,))]
    old = hashlib.sha256()
    for e in tuples:
        for part in (e.prompt_ids, e.chosen_ids, e.rejected_ids):
            old.update(len(part).to_bytes(4, "little") + array("q", part).tobytes())
    arrays = [PrefExample(e.row_id, *(np.asarray(p, dtype=np.uint16) for p in (e.prompt_ids, e.chosen_ids,
                                                                             e.rejected_ids))) for e in tuples]
    assert data_fingerprint(tuples) == data_fingerprint(arrays) == old.hexdigest()
    cache = ReferenceLogps.of(tuples, torch.tensor([[-1.0, -2.0], [-3.0, -4.0]]))
    assert cache.lookup(arrays).tolist() == [-1.0, -3.0, -2.0, -4.0]


def test_cached_training_equals_online_reference(tmp_path):
    """DPO through the loop: cached reference log-probs give the online run's losses (full
    fine-tuning: the reference is the policy's initial weights), packed and padded."""
    from bipost.train.loop import Trainer, train

    online = train(config(tmp_path / "online", "train.max_steps=2", kinds=("dpo",)))
    for packing in ("false", "true"):
        cfg = config(tmp_path / f"cached-{packing}", "train.max_steps=2", "objectives.0.cache_reference=true",
                     f"train.packing={packing}", kinds=("dpo",))
        cached = Trainer(cfg).train()
        assert (tmp_path / f"cached-{packing}" / "cache" / "ref-dpo.pt").exists()
        a = torch.tensor([r["dpo"] for r in online.train_losses])
        b = torch.tensor([r["dpo"] for r in cached.train_losses])
        assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert b[0].item() == __import__("pytest").approx(0.6931472, abs=1e-5)  # policy == reference


def test_cached_values_equal_online_reference_logps(tmp_path):
    """The cache holds exactly the reference model's summed log-probs of each pair."""
    from bipost.train.loop import Trainer

    cfg = config(tmp_path / "r", "objectives.0.cache_reference=true",
                 f"objectives.0.reference={workspace() / 'teacher'}", kinds=("dpo",))
    trainer = Trainer(cfg)
    run = trainer.runs["dpo"]
    assert run.task.reference is None and run.task.ref_cache is not None
    from bipost.data import collate_pref
    from bipost.models import load_causal_lm
    from bipost.objectives import sequence_logprobs

    ref = load_causal_lm(str(workspace() / "teacher"), cfg.model, frozen=True)
    ex = run.train[:5]
    batch = collate_pref(ex, trainer.tokenizer.pad_token_id)
    with torch.no_grad():
        sums, _ = sequence_logprobs(ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                    batch["labels"])
    assert_close(run.task.ref_cache.lookup(ex), sums, rtol=1e-5, atol=1e-5)
    assert_close(run.stream.next()["ref_logps"], run.task.ref_cache.lookup(
        [run.train[i] for i in run.stream.indices(0)]))


def test_stale_or_broken_cache_is_rebuilt_never_used(tmp_path, caplog):
    ex = [PrefExample(0, (1,), (2,), (3,)), PrefExample(1, (4,), (5,), (6,))]
    path = tmp_path / "ref-dpo.pt"
    meta = {"data": "A", "reference": "m", "max_len": 64}
    calls = []

    def build(value):
        def f():
            calls.append(value)
            return torch.full((2, 2), value)
        return f

    assert load_or_build(path, ex, meta, build(-1.0)).lookup(ex[:1]).tolist() == [-1.0, -1.0]
    assert load_or_build(path, ex, meta, build(-2.0)).lookup(ex[:1]).tolist() == [-1.0, -1.0]  # reused
    assert calls == [-1.0]
    with caplog.at_level(logging.WARNING, logger="bipost"):
        changed = dict(meta, max_len=128)  # e.g. another max_len: a different key
        assert load_or_build(path, ex, changed, build(-3.0)).lookup(ex[:1]).tolist() == [-3.0, -3.0]
    assert "stale (changed: max_len)" in caplog.text
    path.write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="bipost"):
        assert load_or_build(path, ex, changed, build(-4.0)).lookup(ex[:1]).tolist() == [-4.0, -4.0]
    assert "unreadable" in caplog.text
    assert calls == [-1.0, -3.0, -4.0]


def test_cache_key_follows_data_model_and_max_len(tmp_path, caplog):
    """Through the run: a second run reuses the cache; changing max_len or the reference's files
    rebuilds it."""
    from bipost.train.loop import Trainer

    common = ["objectives.0.cache_reference=true", f"train.cache_dir={tmp_path / 'cache'}"]
    with caplog.at_level(logging.INFO, logger="bipost"):
        Trainer(config(tmp_path / "a", *common, kinds=("dpo",)))
        assert "computing reference log-probs" in caplog.text
        caplog.clear()
        Trainer(config(tmp_path / "b", *common, kinds=("dpo",)))
        assert "reference log-probs of" in caplog.text and "computing" not in caplog.text
        caplog.clear()
        Trainer(config(tmp_path / "c", *common, "objectives.0.data.max_len=48", kinds=("dpo",)))
        assert "stale (changed: max_len)" in caplog.text  # the tiny rows all fit in 48 tokens
        caplog.clear()
        Trainer(config(tmp_path / "d", *common, "objectives.0.data.max_len=48",
                       f"objectives.0.reference={workspace() / 'teacher'}", kinds=("dpo",)))
        assert "stale (changed: reference, reference_files)" in caplog.text


def test_dpo_run_with_cache_keeps_no_reference_model(tmp_path):
    """ALRIGHT with SFT + DPO and a cached reference: the only causal LM alive is the policy."""
    from transformers import PreTrainedModel

    from bipost.train.loop import Trainer

    trainer = Trainer(config(tmp_path / "r", "schedule.name=alright", "objectives.1.cache_reference=true",
                             "train.max_steps=2", kinds=("sft", "dpo")))
    trainer.train()
    gc.collect()
    models = [o for o in gc.get_objects() if PreTrainedModel in type(o).__mro__]
    inner = trainer.engine.unwrap(trainer.model)
    alive = [m for m in models if m is not inner and not any(m is c for c in inner.modules())]
    assert trainer.runs["dpo"].task.reference is None
    assert alive == [], f"models kept besides the policy: {[type(m).__name__ for m in alive]}"

"""Top-k distillation and the teacher cache (kinds/kd.py through bipost/example_cache.py): hand-derived values, k = V ≡
full forward KD, cached ≡ online, stale caches rebuilt, no teacher resident when cached."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from bipost.configio import ConfigError
from bipost.objectives.kd import topk_kd_loss

from helpers import config, workspace


def test_topk_kd_loss_by_hand():
    """Teacher top-2 log-probs ln 0.6, ln 0.2 renormalize to (0.75, 0.25); the student gives
    those tokens ln 0.5, ln 0.25: CE = -(0.75 ln 0.5 + 0.25 ln 0.25), KL = CE - H(0.75, 0.25)."""
    teacher = torch.log(torch.tensor([[0.6, 0.2]]))
    student = torch.log(torch.tensor([[0.5, 0.25]]))
    ce, kl = topk_kd_loss(student, teacher)
    expected = -(0.75 * math.log(0.5) + 0.25 * math.log(0.25))
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert ce.item() == pytest.approx(expected, rel=1e-6)
    assert kl.item() == pytest.approx(expected - entropy, rel=1e-6)
    ce2, _ = topk_kd_loss(student, teacher, temperature=2.0)  # tau^2 scaling
    assert ce2.item() == pytest.approx(4 * expected, rel=1e-6)


@pytest.mark.parametrize("packing", ["false", "true"])
def test_topk_over_the_whole_vocabulary_is_forward_kd(tmp_path, packing):
    """k = V renormalizes nothing: the loop's KD losses equal full forward KD's."""
    from bipost.run import train

    vocab = len(__import__("bipost.models", fromlist=["load_tokenizer"]).load_tokenizer(str(workspace() / "model")))
    runs = [train(config(tmp_path / f"k{k}", "train.max_steps=2", f"train.packing={packing}",
                         f"objectives.0.kd_topk={k}", "objectives.0.temperature=2.0", kinds=("kd",)))
            for k in (0, vocab)]
    a, b = (torch.tensor([r["kd"] for r in run.train_losses]) for run in runs)
    assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_cached_teacher_equals_online_and_keeps_no_teacher(tmp_path):
    """Top-8 KD from the cache gives the online top-8 run's losses, packed and padded, and the
    cached run holds no teacher model."""
    from bipost.run import build_trainer

    online = build_trainer(config(tmp_path / "online", "train.max_steps=2", "objectives.0.kd_topk=8",
                            kinds=("kd",))).train()
    for packing in ("false", "true"):
        out = tmp_path / f"cached-{packing}"
        trainer = build_trainer(config(out, "train.max_steps=2", "objectives.0.kd_topk=8",
                                 "objectives.0.cache_teacher=true", f"train.packing={packing}", kinds=("kd",)))
        task = trainer.runs["kd"].objective
        assert task.teacher is None and task.teacher_cache is not None
        assert (out / "cache" / "teacher-kd.pt").exists()
        cached = trainer.train()
        a = torch.tensor([r["kd"] for r in online.train_losses])
        b = torch.tensor([r["kd"] for r in cached.train_losses])
        assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides,message", [
    (("objectives.0.cache_teacher=true",), "set objectives.0.kd_topk"),
    (("objectives.0.kd_topk=8", "objectives.0.kd_loss=jsd"), "forward KD"),
    (("objectives.0.kd_topk=-1",), "kd_topk must be >= 0"),
])
def test_topk_config_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, *overrides, kinds=("kd",))


def test_topk_applies_to_kd_only(tmp_path):
    with pytest.raises(ConfigError, match="field of kd objectives, not of sft"):
        config(tmp_path, "objectives.0.kd_topk=8")


@pytest.mark.parametrize("cache", ["false", "true"])
def test_topk_larger_than_the_vocabulary_is_an_error(tmp_path, cache):
    from bipost.run import build_trainer

    with pytest.raises(ValueError, match="exceeds the vocabulary size"):
        build_trainer(config(tmp_path, "objectives.0.kd_topk=100000", f"objectives.0.cache_teacher={cache}",
                       kinds=("kd",)))

"""Top-k distillation and the teacher cache (train/teachercache.py): hand-derived values, k = V ≡
full forward KD, cached ≡ online, stale caches rebuilt, no teacher resident when cached."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch.testing import assert_close

from bipost.configio import ConfigError
from bipost.data.types import SFTExample
from bipost.objectives.kd import topk_kd_loss
from bipost.train.teachercache import TeacherTopK, load_or_build_teacher

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


def test_lookup_follows_batch_order_by_content():
    a, b = SFTExample(0, (1,), (2, 3)), SFTExample(1, (4,), (5,))
    ids = torch.tensor([[1, 2], [3, 4], [5, 6]], dtype=torch.int32)
    logps = -torch.arange(6, dtype=torch.float32).view(3, 2)
    cache = TeacherTopK.of([a, b], torch.tensor([0, 2, 3]), ids, logps)
    got_ids, got_logps = cache.lookup([b, SFTExample(7, (1,), (2, 3))])  # same tokens, other row id
    assert got_ids.tolist() == [[5, 6], [1, 2], [3, 4]] and got_ids.dtype == torch.int64
    assert got_logps.tolist() == [[-4.0, -5.0], [-0.0, -1.0], [-2.0, -3.0]]
    with pytest.raises(KeyError, match="row 9"):
        cache.lookup([SFTExample(9, (8,), (9,))])


@pytest.mark.parametrize("packing", ["false", "true"])
def test_topk_over_the_whole_vocabulary_is_forward_kd(tmp_path, packing):
    """k = V renormalizes nothing: the loop's KD losses equal full forward KD's."""
    from bipost.train.loop import train

    vocab = len(__import__("bipost.models", fromlist=["load_tokenizer"]).load_tokenizer(str(workspace() / "model")))
    runs = [train(config(tmp_path / f"k{k}", "train.max_steps=2", f"train.packing={packing}",
                         f"objectives.0.kd_topk={k}", "objectives.0.temperature=2.0", kinds=("kd",)))
            for k in (0, vocab)]
    a, b = (torch.tensor([r["kd"] for r in run.train_losses]) for run in runs)
    assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_cached_teacher_equals_online_and_keeps_no_teacher(tmp_path):
    """Top-8 KD from the cache gives the online top-8 run's losses, packed and padded, and the
    cached run holds no teacher model."""
    from bipost.train.loop import Trainer

    online = Trainer(config(tmp_path / "online", "train.max_steps=2", "objectives.0.kd_topk=8",
                            kinds=("kd",))).train()
    for packing in ("false", "true"):
        out = tmp_path / f"cached-{packing}"
        trainer = Trainer(config(out, "train.max_steps=2", "objectives.0.kd_topk=8",
                                 "objectives.0.cache_teacher=true", f"train.packing={packing}", kinds=("kd",)))
        task = trainer.runs["kd"].task
        assert task.teacher is None and task.teacher_cache is not None
        assert (out / "cache" / "teacher-kd.pt").exists()
        cached = trainer.train()
        a = torch.tensor([r["kd"] for r in online.train_losses])
        b = torch.tensor([r["kd"] for r in cached.train_losses])
        assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_stale_or_broken_teacher_cache_is_rebuilt(tmp_path, caplog):
    ex = [SFTExample(0, (1,), (2,)), SFTExample(1, (3,), (4, 5))]
    path = tmp_path / "teacher-kd.pt"
    calls = []

    def build(value):
        def f():
            calls.append(value)
            return (torch.tensor([0, 1, 3]), torch.zeros(3, 2, dtype=torch.int32), torch.full((3, 2), value))
        return f

    meta = {"data": "A", "k": 2, "temperature": 1.0}
    assert load_or_build_teacher(path, ex, meta, build(-1.0)).lookup(ex[:1])[1].tolist() == [[-1.0, -1.0]]
    load_or_build_teacher(path, ex, meta, build(-2.0))
    assert calls == [-1.0]  # same key: read, not rebuilt
    with caplog.at_level(logging.WARNING, logger="bipost"):
        got = load_or_build_teacher(path, ex, dict(meta, temperature=2.0), build(-3.0))
    assert calls == [-1.0, -3.0] and got.lookup(ex[:1])[1].tolist() == [[-3.0, -3.0]]
    assert "stale (changed: temperature)" in caplog.text
    path.write_bytes(b"torn")
    load_or_build_teacher(path, ex, dict(meta, temperature=2.0), build(-4.0))
    assert calls[-1] == -4.0 and "unreadable" in caplog.text


@pytest.mark.parametrize("overrides,message", [
    (("objectives.0.cache_teacher=true",), "set objectives.0.kd_topk"),
    (("objectives.0.kd_topk=8", "objectives.0.kd_loss=jsd"), "forward KD"),
    (("objectives.0.kd_topk=-1",), "kd_topk must be >= 0"),
])
def test_topk_config_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, *overrides, kinds=("kd",))


def test_topk_applies_to_kd_only(tmp_path):
    with pytest.raises(ConfigError, match="kd objectives only"):
        config(tmp_path, "objectives.0.kd_topk=8")


def test_every_rank_rebuilds_if_one_must(tmp_path):
    """Ranks agree (any_rank, a collective in training) before building: a rank whose cache is
    valid still rebuilds when another rank's is not, so the teacher's forwards match up."""
    ex = [SFTExample(0, (1,), (2,))]
    calls = []

    def build():
        calls.append(1)
        return torch.tensor([0, 1]), torch.zeros(1, 2, dtype=torch.int32), torch.zeros(1, 2)

    meta = {"data": "A", "k": 2}
    load_or_build_teacher(tmp_path / "t.pt", ex, meta, build)
    load_or_build_teacher(tmp_path / "t.pt", ex, meta, build)
    assert len(calls) == 1
    load_or_build_teacher(tmp_path / "t.pt", ex, meta, build, any_rank=lambda flag: True)
    assert len(calls) == 2


@pytest.mark.parametrize("cache", ["false", "true"])
def test_topk_larger_than_the_vocabulary_is_an_error(tmp_path, cache):
    from bipost.train.loop import Trainer

    with pytest.raises(ValueError, match="exceeds the vocabulary size"):
        Trainer(config(tmp_path, "objectives.0.kd_topk=100000", f"objectives.0.cache_teacher={cache}",
                       kinds=("kd",)))

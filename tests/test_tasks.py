"""Objective losses (model forward + pure loss) against an independent implementation on the same
model and batch: plain transformers forwards and torch's own cross-entropy / softmax (fp32)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from bipost.config import DataConfig, ModelConfig
from bipost.data import ExampleStream, load_objective_data
from bipost.kinds import get_kind
from bipost.models import load_causal_lm, load_tokenizer

from helpers import objective, workspace

RTOL = 1e-5


@functools.lru_cache(maxsize=None)
def _setup():
    ws = workspace()
    tok = load_tokenizer(str(ws / "model"))
    mcfg = ModelConfig(path=str(ws / "model"), dtype="float32")
    model = load_causal_lm(str(ws / "model"), mcfg).eval()
    teacher = load_causal_lm(str(ws / "teacher"), mcfg, frozen=True)
    return ws, tok, model, teacher


def _batch(kind: str, path: str, n: int = 6, **kw) -> tuple[dict, object]:
    ws, tok, *_ = _setup()
    data = load_objective_data(DataConfig(path=path, max_len=64), get_kind(kind).examples, tok)
    task = objective(kind, **kw)
    stream = ExampleStream(data.train, n, task.collate(tok.pad_token_id), seed=0)
    return stream.next(), task


def test_sft_task_matches_transformers_own_loss():
    """SFT's token mean over the batch equals the model's built-in causal-LM loss with the same labels."""
    ws, tok, model, _ = _setup()
    batch, task = _batch("sft", str(ws / "sft.jsonl"))
    out = task.loss(model, batch)
    ours = out.losses.sum() / out.units.sum()
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(ours.detach(), ref, rtol=RTOL, atol=0)


def _summed_logps(model, batch) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels.clamp(min=0), reduction="none")
    return -(ce * (labels != -100)).sum(-1)


def test_dpo_task_matches_independent_dpo(tmp_path):
    """DPO with a separate reference: -log sigmoid(beta * ((pc - pr) - (rc - rr))) from summed
    response log-probs computed with F.cross_entropy on each model's own forward."""
    ws, tok, model, teacher = _setup()
    batch, task = _batch("dpo", str(ws / "pref.jsonl"), beta=0.3, frozen=teacher)  # any frozen model serves
    out = task.loss(model, batch)
    n = batch["row_ids"].shape[0]
    pol, ref = _summed_logps(model, batch), _summed_logps(teacher, batch)
    h = (pol[:n] - pol[n:]) - (ref[:n] - ref[n:])
    expected = -F.logsigmoid(0.3 * h)
    torch.testing.assert_close(out.losses.detach(), expected, rtol=RTOL, atol=1e-7)
    torch.testing.assert_close(out.metrics["logps_chosen"], pol[:n], rtol=RTOL, atol=0)
    torch.testing.assert_close(out.metrics["logps_rejected"], pol[n:], rtol=RTOL, atol=0)
    # rewards are differences of sums of ~60 log-probs: compare absolutely
    torch.testing.assert_close(out.metrics["reward_chosen"], 0.3 * (pol[:n] - ref[:n]), rtol=0, atol=1e-5)


def test_kd_task_matches_independent_forward_kl():
    """KD forward = teacher soft-label cross-entropy at positions predicting response tokens:
    logits at t predict token t+1, so the mask is labels[:, 1:] != -100."""
    ws, tok, model, teacher = _setup()
    batch, task = _batch("kd", str(ws / "copy.jsonl"), frozen=teacher)
    out = task.loss(model, batch)
    with torch.no_grad():
        s = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()[:, :-1]
    mask = (batch["labels"][:, 1:] != -100).float()
    ce = -(F.softmax(t, -1) * F.log_softmax(s, -1)).sum(-1)
    torch.testing.assert_close(out.losses.detach(), (ce * mask).sum(-1), rtol=RTOL, atol=1e-6)
    torch.testing.assert_close(out.units, mask.sum(-1))
    # the first response token is predicted from the last prompt position: it must be counted
    first = (batch["labels"][0] != -100).nonzero()[0, 0]
    assert mask[0, first - 1] == 1


def test_reference_and_teacher_run_without_dropout():
    ws, tok, model, teacher = _setup()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())

"""Chunked log-probs (modeling/lm_head.py) and KD (objectives/chunked.py) ≡ the reference functions on full logits, in
values and gradients, and the task forward path that uses them ≡ the plain full-logits path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from bipost.objectives import kd_loss, sequence_logprobs, sft_loss, token_logprobs
from bipost.modeling.lm_head import chunked_token_logprobs, module_token_logprobs
from bipost.objectives.chunked import chunked_kd_loss
from bipost.objectives.segments import (
    pad_by_sequence,
    response_targets,
    segment_count,
    segment_sum,
    sequence_sft_loss,
)

from bipost.kinds import get_kind

from helpers import config, objective, workspace


def test_linear_logprob_by_hand():
    """H=2, V=2, weight = [[ln 3, 0], [0, 0]], hidden = [1, 0] -> logits [ln 3, 0], softmax
    [3/4, 1/4]. Target 0: log 3/4; target 1: log 1/4. d logp_0 / d logits = onehot - softmax =
    [1/4, -1/4], so d/d hidden = W^T [1/4, -1/4] = [ln3 / 4, 0] and d/d W = outer([1/4, -1/4], h)."""
    w = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]], requires_grad=True)
    h = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    out = chunked_token_logprobs(h, w, torch.tensor([0, 1]), chunk_size=1)
    assert_close(out, torch.tensor([math.log(0.75), math.log(0.25)]))
    out[0].backward()
    assert_close(h.grad, torch.tensor([[math.log(3.0) / 4, 0.0], [0.0, 0.0]]))
    assert_close(w.grad, torch.tensor([[0.25, 0.0], [-0.25, 0.0]]))


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_logprobs_match_log_softmax_values_and_grads(chunk, bias):
    torch.manual_seed(0)
    m, hdim, v = 11, 8, 37
    h = torch.randn(m, hdim, requires_grad=True)
    w = torch.randn(v, hdim, requires_grad=True)
    b = torch.randn(v, requires_grad=True) if bias else None
    y = torch.randint(0, v, (m,))
    g = torch.randn(m)  # arbitrary upstream gradient (DPO's is per sequence, not uniform)

    ref = torch.log_softmax(F.linear(h, w, b), -1).gather(1, y[:, None]).squeeze(1)
    grads_ref = torch.autograd.grad((ref * g).sum(), [h, w] + ([b] if bias else []))
    out = chunked_token_logprobs(h, w, y, b, chunk_size=chunk)
    grads = torch.autograd.grad((out * g).sum(), [h, w] + ([b] if bias else []))
    assert_close(out, ref)
    for a, r in zip(grads, grads_ref):
        assert_close(a, r, rtol=1e-5, atol=1e-6)
    # A module head (e.g. LoRA) through checkpointed chunks gives the same.
    head = torch.nn.Linear(hdim, v, bias=bias)
    with torch.no_grad():
        head.weight.copy_(w)
        if bias:
            head.bias.copy_(b)
    assert_close(module_token_logprobs(h, head, y, chunk), ref)


def test_compiled_chunks_match_eager():
    """model.compile's lm_head path: each chunk's elementwise work through torch.compile gives
    the eager chunked values and gradients (bias included, a short last chunk)."""
    torch.manual_seed(0)
    h = torch.randn(13, 8, requires_grad=True)
    w = torch.randn(37, 8, requires_grad=True)
    b = torch.randn(37, requires_grad=True)
    y = torch.randint(0, 37, (13,))
    g = torch.randn(13)
    results = []
    for compiled in (False, True):
        out = chunked_token_logprobs(h, w, y, b, chunk_size=5, compiled=compiled)
        results.append([out.detach(), *torch.autograd.grad((out * g).sum(), [h, w, b])])
    for a, r in zip(results[1], results[0]):
        assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_chunked_backward_keeps_no_full_logits():
    """Nothing of size [M, V] is saved for the backward: only the logsumexp [M] and the inputs.
    (The plain path saves the [M, V] log-softmax.)"""
    m, hdim, v = 64, 4, 1000
    h = torch.randn(m, hdim, requires_grad=True)
    w = torch.randn(v, hdim, requires_grad=True)
    y = torch.randint(0, v, (m,))
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_token_logprobs(h, w, y, chunk_size=16).sum().backward()
    assert max(saved) < m * v / 10
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.log_softmax(h @ w.T, -1).gather(1, y[:, None]).sum().backward()
    assert max(saved) >= m * v


def test_response_targets_and_segments_match_sequence_logprobs():
    """Positions selected from padded labels reproduce token_logprobs / sequence_logprobs / sft_loss."""
    torch.manual_seed(1)
    logits = torch.randn(3, 6, 9)
    labels = torch.tensor([[-100, -100, 4, 5, 1, -100], [-100, 2, 3, -100, -100, -100],
                           [-100, -100, -100, -100, -100, 7]])
    index, target, seq = response_targets(labels)
    flat = torch.log_softmax(logits.reshape(-1, 9), -1)[index].gather(1, target[:, None]).squeeze(1)
    sums, counts = sequence_logprobs(logits, labels)
    assert_close(segment_sum(flat, seq, 3), sums)
    assert_close(segment_count(seq, 3), counts)
    logps, mask = token_logprobs(logits, labels)
    ref = sft_loss(logps, mask)
    for got in (sft_loss(*pad_by_sequence(flat, seq, 3)), sequence_sft_loss(flat, seq, 3)):
        assert_close(got.losses, ref.losses)
        assert_close(got.units, ref.units)
        assert_close(got.metrics["nll"], ref.metrics["nll"])


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_chunked_kd_matches_kd_loss_values_and_grads(kind):
    torch.manual_seed(2)
    b, t, hdim, v = 2, 5, 6, 13
    hs = torch.randn(b, t, hdim, requires_grad=True)
    ht = torch.randn(b, t, hdim)
    ws, wt = torch.randn(v, hdim, requires_grad=True), torch.randn(v, hdim)
    mask = torch.tensor([[False, True, True, True, False], [True, True, False, False, False]])
    kw = dict(kind=kind, temperature=1.5, jsd_beta=0.3)
    ref = kd_loss(hs @ ws.T, ht @ wt.T, mask, **kw)
    grads_ref = torch.autograd.grad((ref.losses * torch.tensor([1.0, 2.0])).sum(), [hs, ws])

    bi, ti = torch.nonzero(mask, as_tuple=True)
    got = chunked_kd_loss(hs[bi, ti], ht[bi, ti], lambda x: x @ ws.T, lambda x: x @ wt.T, bi, b,
                          chunk_size=2, **kw)
    grads = torch.autograd.grad((got.losses * torch.tensor([1.0, 2.0])).sum(), [hs, ws])
    assert_close(got.losses, ref.losses, rtol=1e-5, atol=1e-6)
    assert_close(got.units, ref.units)
    for k in ref.metrics:
        assert_close(got.metrics[k], ref.metrics[k], rtol=1e-5, atol=1e-6)
    for a, r in zip(grads, grads_ref):
        assert_close(a, r, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the task forward path
def _policy_and_batches():
    from bipost.data import load_objective_data
    from bipost.models import load_causal_lm
    from bipost.train.build import build_policy_and_tokenizer

    cfg = config(workspace() / "unused", kinds=("sft", "dpo"))
    tok, policy = build_policy_and_tokenizer(cfg)
    teacher = load_causal_lm(str(workspace() / "teacher"), cfg.model, frozen=True)
    data = {o.kind: load_objective_data(o.data, get_kind(o.kind).examples, tok).train[:6] for o in cfg.objectives}
    return cfg, tok, policy, teacher, data


@pytest.mark.parametrize("kind", ["sft", "dpo", "kd"])
def test_task_chunked_equals_plain_losses_and_gradients(kind):
    """The sft/dpo/kd objectives with train.logits=chunked (tiny chunks) ≡ plain (full logits and
    the reference loss functions): per-example losses, metrics and every parameter gradient."""
    from bipost.modeling.forward import ForwardOptions

    cfg, tok, policy, teacher, data = _policy_and_batches()
    fields = {"nll_coef": 0.5} if kind == "dpo" else {}
    examples = data["dpo" if kind == "dpo" else "sft"]
    results = {}
    for mode in ("plain", "chunked"):
        task = objective(kind, ForwardOptions(mode, chunk_size=5), frozen=teacher if kind != "sft" else None, **fields)
        batch = task.collate(tok.pad_token_id)(examples)
        policy.zero_grad()
        out = task.loss(policy, batch)
        (out.losses * torch.linspace(0.5, 1.5, out.losses.numel())).sum().backward()
        results[mode] = (out, {n: p.grad.clone() for n, p in policy.named_parameters()})
    (plain, g_plain), (chunked, g_chunked) = results["plain"], results["chunked"]
    assert_close(chunked.losses, plain.losses, rtol=1e-5, atol=1e-6)
    assert_close(chunked.units, plain.units)
    for k in plain.metrics:
        assert_close(chunked.metrics[k], plain.metrics[k], rtol=1e-5, atol=1e-6)
    for n in g_plain:
        assert_close(g_chunked[n], g_plain[n], rtol=1e-4, atol=1e-6)


def test_task_sft_plain_is_the_reference_loss():
    """The plain path is literally token_logprobs + sft_loss on the model's logits."""
    from bipost.modeling.forward import ForwardOptions

    cfg, tok, policy, teacher, data = _policy_and_batches()
    task = objective("sft", ForwardOptions("chunked", 4))
    batch = task.collate(tok.pad_token_id)(data["sft"])
    with torch.no_grad():
        got = task.loss(policy, batch)
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref = sft_loss(*token_logprobs(logits, batch["labels"]))
    assert_close(got.losses, ref.losses, rtol=1e-5, atol=1e-5)
    assert_close(got.units, ref.units)

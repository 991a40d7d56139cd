"""Padding-free packing (data/packing.py + modeling/attention.py): packed rows ≡ padded batches in
losses AND gradients, for SFT, DPO (shared prompts) and KD; and attention never crosses sequences."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from bipost.data.packing import PackedLayout, pack_pref, pack_sft
from bipost.data.types import PrefExample, SFTExample

from bipost.kinds import get_kind

from helpers import config, objective, workspace


def test_pack_sft_layout_by_hand():
    """Examples (prompt 1 2 | response 3 4) and (prompt 5 | response 6):
    row 1 2 3 4 5 6, positions 0 1 2 3 0 1. Position 1 (token 2) predicts 3, position 2 predicts
    4 (sequence 0); position 4 (token 5) predicts 6 (sequence 1). Nothing predicts across the
    boundary (position 3 -> 5)."""
    b = pack_sft([SFTExample(7, (1, 2), (3, 4)), SFTExample(9, (5,), (6,))])
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1]]
    assert b["logp_index"].tolist() == [1, 2, 4]
    assert b["logp_target"].tolist() == [3, 4, 6]
    assert b["logp_seq"].tolist() == [0, 0, 1]
    assert b["row_ids"].tolist() == [7, 9]
    assert b["packed_layout"].segments == [(0, 4, 0, 0), (4, 6, 0, 0)]


def test_pack_pref_layout_by_hand():
    """Pairs (prompt 1 2 | chosen 3 | rejected 4 5) and (prompt 6 | chosen 7 8 | rejected 9):
    row 1 2 3 6 7 8 | 4 5 | 9 (each prompt once). Rejected 4 5 continues positions 2 3 after
    its prompt and attends to it (prefix [0, 2)); rejected 9 has prefix [3, 4).
    Chosen 0 (seq 0): position 1 predicts 3. Chosen 1 (seq 1): 3 -> 7, 4 -> 8.
    Rejected 0 (seq 2): the prompt's last position 1 predicts 4, position 6 predicts 5.
    Rejected 1 (seq 3): position 3 (prompt token 6) predicts 9."""
    b = pack_pref([PrefExample(0, (1, 2), (3,), (4, 5)), PrefExample(1, (6,), (7, 8), (9,))])
    assert b["input_ids"].tolist() == [[1, 2, 3, 6, 7, 8, 4, 5, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 2, 3, 1]]
    assert b["packed_layout"].segments == [(0, 3, 0, 0), (3, 6, 0, 0), (6, 8, 0, 2), (8, 9, 3, 4)]
    assert b["logp_index"].tolist() == [1, 3, 4, 1, 6, 3]
    assert b["logp_target"].tolist() == [3, 7, 8, 4, 5, 9]
    assert b["logp_seq"].tolist() == [0, 1, 1, 2, 2, 3]
    assert b["attention_mask"].sum() == 9  # tokens actually processed


def test_layout_rejects_gaps_and_misplaced_prefixes():
    with pytest.raises(ValueError, match="tile"):
        PackedLayout([(0, 2, 0, 0), (3, 4, 0, 0)])
    with pytest.raises(ValueError, match="prefix"):
        PackedLayout([(0, 2, 0, 0), (2, 4, 1, 3)])
    with pytest.raises(ValueError, match="without a prefix"):
        PackedLayout([(0, 2, 0, 0), (2, 3, 0, 1), (3, 4, 0, 0)])


@pytest.fixture(scope="module")
def setup():
    from bipost.data import load_objective_data
    from bipost.models import load_causal_lm
    from bipost.modeling.attention import use_packed_attention
    from bipost.train.build import build_policy_and_tokenizer

    cfg = config(workspace() / "unused", kinds=("sft", "dpo"))
    tok, policy = build_policy_and_tokenizer(cfg)
    use_packed_attention(policy)
    teacher = load_causal_lm(str(workspace() / "teacher"), cfg.model, frozen=True)
    use_packed_attention(teacher)
    data = {o.kind: load_objective_data(o.data, get_kind(o.kind).examples, tok).train[:7] for o in cfg.objectives}
    return tok, policy, teacher, data


def test_attention_never_crosses_sequences(setup):
    """Changing every token of the second sequence leaves the first sequence's log-probs as
    they are, and equals running the first sequence alone."""

    tok, policy, _, data = setup
    task = objective("sft", packing=True)
    a, b = data["sft"][:2]
    other = SFTExample(b.row_id, tuple((t + 5) % 150 for t in b.prompt_ids), b.response_ids)
    with torch.no_grad():
        la = task.loss(policy, pack_sft([a, b])).losses[0]
        lb = task.loss(policy, pack_sft([a, other])).losses[0]
        alone = task.loss(policy, pack_sft([a])).losses[0]
    assert_close(la, lb, rtol=1e-6, atol=1e-6)
    assert_close(la, alone, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["sft", "dpo", "kd"])
@pytest.mark.parametrize("logits", ["plain", "chunked"])
def test_packed_equals_padded_losses_and_gradients(setup, kind, logits):
    """One packed row ≡ the right-padded batch of the same examples: per-example losses,
    units, metrics and all parameter gradients (DPO with the shared-prompt layout)."""
    from bipost.modeling.forward import ForwardOptions

    tok, policy, teacher, data = setup
    fields = {"nll_coef": 0.3} if kind == "dpo" else {}
    examples = data["dpo" if kind == "dpo" else "sft"]
    results = {}
    for packing in (False, True):
        task = objective(kind, ForwardOptions(logits, chunk_size=8), packing, frozen=teacher if kind != "sft" else None,
                         **fields)
        batch = task.collate(tok.pad_token_id)(examples)
        assert ("packed_layout" in batch) is packing
        policy.zero_grad()
        out = task.loss(policy, batch)
        (out.losses * torch.linspace(0.5, 1.5, out.losses.numel())).sum().backward()
        results[packing] = (out, task.units(batch), {n: p.grad.clone() for n, p in policy.named_parameters()})
    (padded, u_pad, g_pad), (packed, u_pack, g_pack) = results[False], results[True]
    assert u_pad == u_pack
    assert_close(packed.losses, padded.losses, rtol=1e-5, atol=1e-5)
    assert_close(packed.units, padded.units)
    for k in padded.metrics:
        assert_close(packed.metrics[k], padded.metrics[k], rtol=1e-5, atol=1e-5)
    for n in g_pad:
        assert_close(g_pack[n], g_pad[n], rtol=1e-4, atol=1e-6)


def test_dpo_packed_row_is_shorter_than_padded(setup):
    """The point of the shared prompt: the packed row holds sum(p + c + r) tokens, fewer than the
    padded batch's non-padding sum(2p + c + r)."""
    tok, _, _, data = setup
    ex = data["dpo"]
    packed = pack_pref(ex)
    assert packed["input_ids"].shape[1] == sum(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids)
                                               for e in ex)
    from bipost.data import collate_pref

    assert collate_pref(ex, tok.pad_token_id)["attention_mask"].sum() > packed["input_ids"].shape[1]


def test_training_with_packing_matches_padded_run(tmp_path):
    """End to end through the loop (SFT + DPO mixed, accumulation 2, gradient checkpointing on):
    train.packing=true gives the padded run's step losses."""
    from bipost.run import train

    kinds = ("sft", "dpo")
    common = ["train.max_steps=2", "train.micro_batch_size=4", "model.gradient_checkpointing=true"]
    padded = train(config(tmp_path / "pad", *common, kinds=kinds))
    packed = train(config(tmp_path / "pack", *common, "train.packing=true", kinds=kinds))
    for name in kinds:
        a = [r[name] for r in padded.train_losses]
        b = [r[name] for r in packed.train_losses]
        assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the varlen kernel runs on CUDA only")
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_varlen_kernel_matches_padded_on_gpu(kind):
    """bf16 on CUDA, where packed rows take torch's flash varlen kernel (both groups: plain
    segments, and rejected responses against their gathered prompt keys): losses and gradients
    match the padded batch to bf16 accuracy."""
    from bipost.data import load_objective_data
    from bipost.modeling.attention import use_packed_attention, varlen_available
    from bipost.modeling.forward import ForwardOptions
    from bipost.models import load_tokenizer
    from transformers import AutoModelForCausalLM

    assert varlen_available(torch.device("cuda"))
    ws = workspace()
    tok = load_tokenizer(str(ws / "model"))
    model = AutoModelForCausalLM.from_pretrained(ws / "model", dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").cuda()
    use_packed_attention(model)
    from bipost.config import DataConfig

    path = ws / ("pref.jsonl" if kind == "dpo" else "sft.jsonl")
    examples = load_objective_data(DataConfig(path=str(path), max_len=64), get_kind(kind).examples, tok).train[:8]
    outs = {}
    for packing in (False, True):
        task = objective(kind, ForwardOptions("chunked"), packing)
        batch = task.collate(tok.pad_token_id)(examples)
        if kind == "dpo":
            batch["ref_logps"] = torch.zeros(2 * len(examples))
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
        model.zero_grad(set_to_none=True)
        out = task.loss(model, batch)
        out.losses.sum().backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
        outs[packing] = (out.losses.detach().float(), grads)
    (l0, g0), (l1, g1) = outs[False], outs[True]
    assert (l1 - l0).norm() / l0.norm() < 2e-2
    assert (g1 - g0).norm() / g0.norm() < 5e-2

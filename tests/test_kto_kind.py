"""The ``kto`` kind: its data (TRL's unpaired rows; preference pairs split into two examples), each
example's mismatched completion fixed by the data, the reference point z0 over the whole step, hand
values through the kind, and the loop's equivalences (accumulation, packing, cached reference).
Two ranks == one rank is checked in tests/test_distributed.py (the DDP launch trains KTO too).

The fake ``Forward`` gives every response token ``t`` the log-prob ``-t / scale`` of the "model" it
is asked about (policy scale 10, reference scale 8), so summed log-probs follow from the token ids.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from bipost.config import DataConfig
from bipost.data import DataError, Row, format_row, load_objective_data
from bipost.data.types import as_tuples
from bipost.engine import LocalComm
from bipost.kinds import StepContext
from bipost.kinds.kto import (KTO, KTO_EXAMPLES, KTOConfig, KTOExample, KTOText, MismatchedCompletions,
                              kto_format_row, mismatched_partners)
from bipost.run import build_trainer, train
from bipost.train.metrics import read_metrics

from helpers import EOS, POLICY, REFERENCE, TokenLogps, config, workspace



def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def unpaired_rows() -> list[dict]:
    """The workspace's preference pairs as TRL's unpaired rows: even rows keep the chosen
    completion (desirable), odd rows the rejected one."""
    rows = [json.loads(line) for line in (workspace() / "pref.jsonl").read_text().splitlines()]
    return [{"prompt": r["prompt"], "completion": r["chosen"] if i % 2 == 0 else r["rejected"], "label": i % 2 == 0}
            for i, r in enumerate(rows)]


def unpaired_file(folder):
    path = folder / "unpaired.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in unpaired_rows()))
    return path


# ------------------------------------------------------------------------------- data
def row(data: dict, index: int = 0) -> Row:
    return Row(row_id=index, data=data, source="train.jsonl", index=index, line=index + 1)


def test_row_formats(tiny_tokenizer):
    """Unpaired rows (strings or conversations) give their completion on its label's side; a
    preference row both completions; a label that is not a boolean is a skip, a missing one an error."""
    cfg = DataConfig(path="x")
    fmt = lambda data, f: kto_format_row(row(data), f, cfg, tiny_tokenizer)  # noqa: E731
    assert fmt({"prompt": "Q", "completion": " yes", "label": True}, "unpaired_preference") == KTOText("Q", " yes", None)
    assert fmt({"prompt": "Q", "completion": " no", "label": False}, "unpaired_preference") == KTOText("Q", None, " no")
    conv = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}],
            "label": False}
    assert fmt(conv, "unpaired_preference") == KTOText("<|user|>hi<eos><|assistant|>", None, "yo<eos>")
    assert fmt({"prompt": "Q", "chosen": " a", "rejected": " b"}, "preference") == KTOText("Q", " a", " b")
    assert fmt({"prompt": "Q", "completion": " a", "label": "true"}, "unpaired_preference") == "non-boolean 'label'"
    assert fmt({"prompt": "Q", "completion": " a", "label": 1}, "unpaired_preference") == "non-boolean 'label'"
    assert fmt({"prompt": "Q", "completion": " a", "label": None}, "unpaired_preference") == "null 'label'"
    assert fmt({"prompt": "Q", "completion": " a", "label": np.bool_(True)}, "unpaired_preference").desirable == " a"
    with pytest.raises(DataError, match="missing key 'ok'"):
        kto_format_row(row({"prompt": "Q", "completion": " a"}), "unpaired_preference", DataConfig(path="x", label_key="ok"))
    # the shared formatter gives the same text parts, labelled
    assert format_row(row({"prompt": "Q", "completion": " a", "label": True}), "unpaired_preference", cfg).label is True


def test_pairs_split_into_two_examples_with_the_row_id(write_jsonl, tiny_tokenizer):
    """A preference row becomes a desirable (chosen) and an undesirable (rejected) example, both with
    the row's id and with exactly the prompt and response ids DPO's example of that row has."""
    rows = [{"prompt": f"question {i}?", "chosen": f" good {i}", "rejected": f" bad {i} no"} for i in range(5)]
    rows[3]["rejected"] = rows[3]["chosen"]  # a tie: skipped whole, as for DPO
    path = write_jsonl(rows)
    kto = load_objective_data(DataConfig(path=str(path)), KTO_EXAMPLES, tiny_tokenizer)
    dpo = load_objective_data(DataConfig(path=str(path)), "pref", tiny_tokenizer)
    assert kto.summary.format == "preference" and kto.summary.skipped == {"identical 'chosen' and 'rejected'": 1}
    assert [(e.row_id, e.desirable) for e in kto.train] == [(i, d) for i in (0, 1, 2, 4) for d in (True, False)]
    for pair, (good, bad) in zip(dpo.train, zip(kto.train[0::2], kto.train[1::2])):
        pair, good, bad = as_tuples(pair), as_tuples(good), as_tuples(bad)
        assert good.prompt_ids == bad.prompt_ids == pair.prompt_ids
        assert (good.completion_ids, bad.completion_ids) == (pair.chosen_ids, pair.rejected_ids)


def test_unpaired_rows_are_detected_and_keep_their_labels(write_jsonl, tiny_tokenizer):
    rows = [{"prompt": f"q {i}", "completion": f" answer {i}", "label": i % 3 == 0} for i in range(6)]
    rows[4]["label"] = "no"
    data = load_objective_data(DataConfig(path=str(write_jsonl(rows)), max_len=8), KTO_EXAMPLES, tiny_tokenizer)
    assert data.summary.format == "unpaired_preference"
    assert data.summary.skipped == {"non-boolean 'label'": 1}
    assert [(e.row_id, e.desirable) for e in data.train] == [(0, True), (1, False), (2, False), (3, True), (5, False)]
    assert all(len(e) <= 8 and e.completion_ids[-1] == tiny_tokenizer.eos_token_id for e in data.train)


# ------------------------------------------------------------------------------- mismatched pairs
def test_mismatched_partners_are_fixed_by_the_data():
    """Unpaired rows: a derangement (a permutation without fixed points: a random cycle over the
    rows). Pairs split in two: each example takes the same-label example of another row, so every
    completion is used exactly once. Seeded: the same pairs every time, other pairs for another seed."""
    rows = np.arange(10) * 3
    labels = np.arange(10) % 3 == 0
    p = mismatched_partners(rows, labels, seed=0)
    assert sorted(p) == list(range(10)) and all(p != np.arange(10))
    assert np.array_equal(p, mismatched_partners(rows, labels, seed=0))
    assert not np.array_equal(p, mismatched_partners(rows, labels, seed=1))
    split_rows, split_labels = np.repeat(np.arange(6), 2), np.tile([True, False], 6)
    q = mismatched_partners(split_rows, split_labels, seed=3)
    assert sorted(q) == list(range(12))
    assert all(split_rows[q] != split_rows) and all(split_labels[q] == split_labels)
    with pytest.raises(ValueError, match="at least 2 rows"):
        mismatched_partners(np.array([4, 4]), np.array([True, False]), seed=0)


# Two examples (hand values below), max_len 4:
#   a: row 0, desirable,   prompt (1, 3), completion (5, EOS)
#   b: row 1, undesirable, prompt (3,),   completion (7, 8, EOS)
# Two rows: the cycle is forced, a's mismatched completion is b's cut to 4 - 2 = 2 tokens: (7, EOS);
# b's is a's (5, EOS) (it fits).
A = KTOExample(0, (1, 3), (5, EOS), True)
B = KTOExample(1, (3,), (7, 8, EOS), False)


def kto(packing: bool, **fields) -> KTO:
    cfg = KTOConfig(kind="kto", name="kto", **fields)
    return KTO(cfg, TokenLogps(), packing, reference=REFERENCE,
               mismatched=MismatchedCompletions([[A, B]], seed=0, max_len=4))


def step(obj: KTO, batches: list[list[KTOExample]]) -> list:
    collate = obj.collate(0)
    prepared = obj.prepare(POLICY, [collate(b) for b in batches], StepContext(0, LocalComm(), lambda b: b))
    return [obj.loss(POLICY, b) for b in prepared]


def test_mismatched_completion_is_another_rows_cut_to_fit():
    m = MismatchedCompletions([[A, B]], seed=0, max_len=4)
    assert m.partner_of(A) == B and m.partner_of(B) == A
    assert tuple(m.completion(A)) == (7, EOS) and tuple(m.completion(B)) == (5, EOS)
    with pytest.raises(KeyError, match="row 5"):
        m.partner_of(KTOExample(5, (1,), (5, EOS), True))
    # an eval set is paired within itself; one of a single row takes a training completion of its label
    c, d = KTOExample(0, (4,), (9, EOS), False), KTOExample(1, (4,), (6, EOS), False)
    m = MismatchedCompletions([[A, B], [c, d]], seed=0, max_len=4)
    assert m.partner_of(c) == d and m.partner_of(d) == c and m.partner_of(A) == B
    m = MismatchedCompletions([[A, B], [c]], seed=0, max_len=4)
    assert m.partner_of(c) == B
    with pytest.raises(ValueError, match="its training examples: mismatched prompt-completion pairs need at least 2"):
        MismatchedCompletions([[A]], seed=0, max_len=4)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_hand_values_through_the_kind(packing):
    """beta 0.5, w_D 1, w_U 2. Policy -t/10, reference -t/8 per response token.
    a: policy -(5 + 2)/10 = -0.7, reference -7/8 = -0.875, r_a = 0.175.
    b: policy -(7 + 8 + 2)/10 = -1.7, reference -17/8 = -2.125, r_b = 0.425.
    Mismatched pairs: a's prompt with (7, EOS): -0.9 - (-1.125) = 0.225; b's prompt with (5, EOS):
    -0.7 - (-0.875) = 0.175. z0 = max(0, (0.225 + 0.175) / 2) = 0.2 (the matched pairs would give 0.3).
    a (desirable): w_D s(beta (z0 - r_a)) = s(0.0125) = 0.503125;
    b (undesirable): w_U s(beta (r_b - z0)) = 2 s(0.1125) = 1.056190.
    One micro-batch of both, or one micro-batch each (accumulation): the same z0, the same losses."""
    want = torch.tensor([sig(0.5 * (0.2 - 0.175)), 2 * sig(0.5 * (0.425 - 0.2))])
    assert_close(want, torch.tensor([0.503125, 1.056190]), rtol=0, atol=1e-6)
    (whole,) = step(kto(packing, beta=0.5, undesirable_weight=2.0), [[A, B]])
    assert_close(whole.losses, want, rtol=0, atol=1e-6)
    assert_close(whole.metrics["z0"], torch.tensor([0.2, 0.2]), rtol=0, atol=1e-7)
    assert_close(whole.metrics["reward"], torch.tensor([0.5 * 0.175, 0.5 * 0.425]), rtol=0, atol=1e-6)
    parts = step(kto(packing, beta=0.5, undesirable_weight=2.0), [[A], [B]])
    assert_close(torch.cat([o.losses for o in parts]), whole.losses, rtol=0, atol=0)
    assert_close(torch.cat([o.metrics["z0"] for o in parts]), whole.metrics["z0"], rtol=0, atol=0)
    # measure: one batch's own pairs (here the whole step), no prepare needed
    obj = kto(packing, beta=0.5, undesirable_weight=2.0)
    assert_close(obj.measure(POLICY, obj.collate(0)([A, B])).losses, want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="reference point z0 in prepare"):
        obj.loss(POLICY, obj.collate(0)([A, B]))


# ------------------------------------------------------------------------------- through the loop
def test_first_step_loss_is_half_when_the_policy_is_the_reference(tmp_path):
    """At step 0 the policy is its reference: every reward and KL estimate is 0, z0 = 0, and each
    example loses s(0) = 0.5 with unit weights."""
    result = train(config(tmp_path / "r", "train.max_steps=1", kinds=("kto",)))
    assert result.train_losses[0]["kto"] == pytest.approx(0.5, abs=1e-6)


def test_micro_batch_times_accumulation_is_one_big_batch(tmp_path):
    """Micro-batch 2 x accumulation 4 == 8 x 1: the same z0 (over the whole step), losses and weights."""
    big = train(config(tmp_path / "big", "train.max_steps=3", kinds=("kto",)))
    small = train(config(tmp_path / "small", "train.max_steps=3", "train.micro_batch_size=2", kinds=("kto",)))
    assert_close(torch.tensor([r["kto"] for r in small.train_losses]),
                 torch.tensor([r["kto"] for r in big.train_losses]), rtol=1e-5, atol=1e-6)
    z0 = [[r["kto/z0"] for r in read_metrics(d / "metrics.jsonl")] for d in (tmp_path / "big", tmp_path / "small")]
    assert z0[0][1] > 0  # the policy moved away from the reference: a reference point that is not 0
    assert_close(torch.tensor(z0[1]), torch.tensor(z0[0]), rtol=1e-5, atol=1e-7)
    from safetensors.torch import load_file

    a, b = load_file(big.final_dir / "model.safetensors"), load_file(small.final_dir / "model.safetensors")
    for k in a:  # Adam: up to ~lr per step where a gradient is ~0 (see test_train)
        assert_close(a[k], b[k], rtol=0, atol=2e-4)


def test_packed_equals_padded_and_cached_reference_equals_online(tmp_path):
    """Packed rows give the padded run's losses; cached reference log-probs (completions and
    mismatched completions) give the online reference's, and no reference model is kept."""
    padded = train(config(tmp_path / "pad", "train.max_steps=3", kinds=("kto",)))
    packed = train(config(tmp_path / "pack", "train.max_steps=3", "train.packing=true", kinds=("kto",)))
    cfg = config(tmp_path / "cache", "train.max_steps=3", "objectives.0.cache_reference=true", kinds=("kto",))
    trainer = build_trainer(cfg)
    assert trainer.runs["kto"].objective.reference is None and (tmp_path / "cache" / "cache" / "ref-kto.pt").exists()
    cached = trainer.train()
    want = torch.tensor([r["kto"] for r in padded.train_losses])
    for other in (packed, cached):
        assert_close(torch.tensor([r["kto"] for r in other.train_losses]), want, rtol=1e-5, atol=1e-6)


def test_paired_with_sft_under_alright_on_unpaired_rows(tmp_path):
    """KTO on TRL-style unpaired rows alongside SFT, ALRIGHT; its held-out loss is measured too."""
    result = train(config(tmp_path / "run", "schedule.name=alright", "train.max_steps=6",
                          f"objectives.1.data.path={unpaired_file(tmp_path)}", "objectives.1.data.eval_fraction=0.125",
                          "objectives.1.desirable_weight=1.2", kinds=("sft", "kto")))
    assert {r["ran"][0] for r in result.train_losses} == {"sft", "kto"}
    assert all(math.isfinite(r[r["ran"][0]]) for r in result.train_losses)
    assert math.isfinite(result.eval_history[-1]["kto"])


def test_kto_is_the_selectors_upper_level_not_its_lower(tmp_path):
    """The selector weights the lower objective's rows (a KTO row may be two examples): KTO can be
    the trusted upper level only."""
    with pytest.raises(Exception, match="selector.objective 'kto' is a kto objective"):
        build_trainer(config(tmp_path / "s", "selector.enabled=true", "schedule.name=bilevel", kinds=("sft", "kto")))
    result = train(config(tmp_path / "u", "selector.enabled=true", "schedule.name=bilevel", "train.max_steps=2",
                          kinds=("kto", "sft")))
    assert [r["ran"] for r in result.train_losses] == [["kto", "sft"]] * 2
    assert (tmp_path / "u" / "selector").is_dir()

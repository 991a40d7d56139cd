"""Objectives: values derived by hand (docstrings), then checked with assert_close.

Most hand examples use a two-token vocabulary, where ``logits = [ln 3, 0]`` gives
``softmax = [3/4, 1/4]`` and ``logits = [0, 0]`` gives ``[1/2, 1/2]``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from bipost.objectives import (
    DPOLoss,
    ObjectiveOutput,
    dpo_loss,
    kd_loss,
    next_token_mask,
    sequence_logprobs,
    sft_loss,
    token_logprobs,
)

LN2, LN3 = math.log(2.0), math.log(3.0)
INF = float("inf")


def t(x, **kw) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32, **kw)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# --------------------------------------------------------------------------- logprobs


def test_next_token_mask_is_shifted_labels():
    """labels [-100, -100, 5, 7, -100] -> mask over labels[1:] = [F, T, T, F]."""
    labels = torch.tensor([[-100, -100, 5, 7, -100]])
    assert next_token_mask(labels).tolist() == [[False, True, True, False]]


def test_token_logprobs_shift_by_hand():
    """T=3, V=2, labels = [-100, 1, 0] (unshifted).

    Position 0 (logits [0, 0]) predicts labels[1] = 1: log 1/2 = -ln 2.
    Position 1 (logits [ln 3, 0]) predicts labels[2] = 0: log 3/4 = ln 3 - 2 ln 2.
    Position 2 predicts nothing and is dropped -> outputs have length T - 1 = 2.
    A second row with labels [-100, -100, 1] masks position 0 (value exactly 0) and gives
    log 1/4 = -2 ln 2 at position 1. sequence_logprobs sums these: counts 2 and 1.
    """
    logits = t([[[0.0, 0.0], [LN3, 0.0], [9.0, -9.0]]]).repeat(2, 1, 1)
    labels = torch.tensor([[-100, 1, 0], [-100, -100, 1]])
    logps, mask = token_logprobs(logits, labels)
    assert logps.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask.tolist() == [[True, True], [False, True]]
    assert_close(logps, t([[-LN2, LN3 - 2 * LN2], [0.0, -2 * LN2]]))

    sums, counts = sequence_logprobs(logits, labels)
    assert_close(sums, t([-LN2 + LN3 - 2 * LN2, -2 * LN2]))
    assert_close(counts, t([2.0, 1.0]))


def test_token_logprobs_matches_cross_entropy():
    """Independent reference: -F.cross_entropy(reduction='none') on the shifted tensors
    (it ignores -100 itself, returning 0 there). bf16 input still yields fp32 output."""
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 7, 11
    logits = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100  # prompt
    labels[1, 5:] = -100  # padding
    labels[2, :] = -100  # no response at all
    logps, mask = token_logprobs(logits, labels)
    ref = -F.cross_entropy(
        logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1), reduction="none"
    ).view(B, T - 1)
    assert_close(logps, ref, rtol=1e-5, atol=1e-6)
    assert_close(mask, labels[:, 1:] != -100)
    assert torch.isfinite(logps).all()
    assert (logps[~mask] == 0).all()

    logps_bf16, _ = token_logprobs(logits.bfloat16(), labels)
    assert logps_bf16.dtype == torch.float32


def test_token_logprobs_masked_inf_logit_is_zero_and_grad_finite():
    """A -inf logit at the target of a masked position must not leak (value 0, finite grads)."""
    logits = t([[[-INF, 0.0], [0.0, 0.0], [0.0, 0.0]]], requires_grad=True)
    labels = torch.tensor([[-100, -100, 1]])
    # position 0 would predict label 0 (logit -inf) if it were not masked.
    logps, mask = token_logprobs(logits, labels)
    assert_close(logps, t([[0.0, -LN2]]))
    logps.sum().backward()
    assert torch.isfinite(logits.grad).all()


# --------------------------------------------------------------------------- SFT


def test_sft_loss_sums_units_and_nll():
    """Row 0: logps [-ln 2, -ln 4, (masked) -inf] -> loss ln 2 + 2 ln 2 = 3 ln 2, 2 units,
    mean NLL 1.5 ln 2. Row 1: no tokens -> loss 0, 0 units, nll 0 (not NaN)."""
    logps = t([[-LN2, -2 * LN2, -INF], [-1.0, -2.0, -3.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    out = sft_loss(logps, mask)
    assert isinstance(out, ObjectiveOutput)
    assert_close(out.losses, t([3 * LN2, 0.0]))
    assert_close(out.units, t([2.0, 0.0]))
    assert_close(out.metrics["nll"], t([1.5 * LN2, 0.0]))
    assert not out.metrics["nll"].requires_grad


# --------------------------------------------------------------------------- DPO

# pi_c = -10, pi_r = -12, ref_c = -11, ref_r = -11  =>  h = (-10 + 12) - (-11 + 11) = 2.
PAIR = dict(
    policy_chosen_logps=t([-10.0]),
    policy_rejected_logps=t([-12.0]),
    ref_chosen_logps=t([-11.0]),
    ref_rejected_logps=t([-11.0]),
)


def test_dpo_sigmoid_hand_value():
    """h = 2, beta = 0.5: beta h = 1, loss = -log sigmoid(1) = ln(1 + e^-1) ~= 0.31326."""
    out = dpo_loss(**PAIR, beta=0.5)
    assert_close(out.losses, t([math.log1p(math.exp(-1.0))]))
    assert_close(out.losses, t([0.3132617]))
    assert_close(out.units, t([1.0]))


def test_dpo_label_smoothing_hand_value():
    """cDPO with eps = 0.1, beta h = 1:
    0.9 * ln(1 + e^-1) + 0.1 * ln(1 + e^1) = 0.9 * 0.31326 + 0.1 * 1.31326 = 0.41326."""
    out = dpo_loss(**PAIR, beta=0.5, label_smoothing=0.1)
    expected = -0.9 * log_sigmoid(1.0) - 0.1 * log_sigmoid(-1.0)
    assert_close(out.losses, t([expected]))
    assert_close(out.losses, t([0.4132617]))


def test_dpo_ipo_hand_value():
    """IPO on sums: beta = 0.5 -> 1 / (2 beta) = 1; h = 2 -> (2 - 1)^2 = 1.
    With beta = 0.25 -> target 2 -> (2 - 2)^2 = 0; with beta = 1 -> (2 - 0.5)^2 = 2.25."""
    assert_close(dpo_loss(**PAIR, beta=0.5, loss_type="ipo").losses, t([1.0]))
    assert_close(dpo_loss(**PAIR, beta=0.25, loss_type=DPOLoss.IPO).losses, t([0.0]))
    assert_close(dpo_loss(**PAIR, beta=1.0, loss_type="ipo").losses, t([2.25]))


def test_dpo_nll_term():
    """nll_coef 0.5 * chosen_nll 2.0 adds exactly 1.0 to the sigmoid loss."""
    base = dpo_loss(**PAIR, beta=0.5).losses
    out = dpo_loss(**PAIR, beta=0.5, chosen_nll=t([2.0]), nll_coef=0.5)
    assert_close(out.losses, base + 1.0)


def test_dpo_rewards_margin_accuracy():
    """beta = 0.5. Pair 0: reward_c = 0.5 (-10 + 11) = 0.5, reward_r = 0.5 (-12 + 11) = -0.5,
    margin 1, accuracy 1. Pair 1 (chosen and rejected swapped): -0.5, 0.5, -1, 0."""
    out = dpo_loss(
        t([-10.0, -12.0]), t([-12.0, -10.0]), t([-11.0, -11.0]), t([-11.0, -11.0]), beta=0.5
    )
    m = out.metrics
    assert_close(m["reward_chosen"], t([0.5, -0.5]))
    assert_close(m["reward_rejected"], t([-0.5, 0.5]))
    assert_close(m["margin"], t([1.0, -1.0]))
    assert_close(m["accuracy"], t([1.0, 0.0]))
    assert_close(m["logps_chosen"], t([-10.0, -12.0]))
    assert_close(m["logps_rejected"], t([-12.0, -10.0]))
    # pair 1 has h = -2: loss = -log sigmoid(-1) = ln(1 + e).
    assert_close(out.losses, t([math.log1p(math.exp(-1.0)), math.log1p(math.e)]))


def test_dpo_pair_mean_and_gradients():
    """units are ones, so sum(losses) / sum(units) is the mean over pairs; only the policy
    gets gradients (reference log-probs are detached); metrics carry no graph."""
    g = torch.Generator().manual_seed(1)
    pc, pr = (torch.randn(5, generator=g).requires_grad_() for _ in range(2))
    rc, rr = (torch.randn(5, generator=g).requires_grad_() for _ in range(2))
    out = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert_close(out.losses.sum() / out.units.sum(), out.losses.mean())
    out.losses.sum().backward()
    assert pc.grad is not None and pr.grad is not None
    assert rc.grad is None and rr.grad is None
    assert all(not v.requires_grad and v.shape == (5,) for v in out.metrics.values())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(beta=0.0),
        dict(beta=-1.0),
        dict(label_smoothing=0.5),
        dict(label_smoothing=-0.1),
        dict(loss_type="exo_pair"),  # a TRL loss type bipost does not implement
        dict(loss_type="ipo", label_smoothing=0.1),
        dict(nll_coef=1.0),  # chosen_nll missing
    ],
)
def test_dpo_validation(kwargs):
    with pytest.raises(ValueError):
        dpo_loss(**PAIR, **kwargs)


# --------------------------------------------------------------------------- KD

# One position, V = 2: teacher [ln 3, 0] -> p_T = [3/4, 1/4]; student [0, 0] -> p_S = [1/2, 1/2].
TEACHER = t([[[LN3, 0.0]]])
STUDENT = t([[[0.0, 0.0]]])
ONE = torch.tensor([[True]])
H_T = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # teacher entropy ~= 0.56234


def test_kd_forward_ce_and_kl_hand_value():
    """CE = -(3/4 ln 1/2 + 1/4 ln 1/2) = ln 2. KL(p_T || p_S) = ln 2 - H(p_T)
    = ln 2 + 3/4 ln 3/4 + 1/4 ln 1/4 = 3/4 ln 3 - ln 2 ~= 0.13081."""
    out = kd_loss(STUDENT, TEACHER, ONE)
    assert_close(out.losses, t([LN2]))
    assert_close(out.units, t([1.0]))
    assert_close(out.metrics["kd"], t([LN2]))
    assert_close(out.metrics["kl"], t([LN2 - H_T]))
    assert_close(out.metrics["kl"], t([0.75 * LN3 - LN2]))


def test_kd_reverse_hand_value():
    """KL(p_S || p_T) = 1/2 ln((1/2)/(3/4)) + 1/2 ln((1/2)/(1/4)) = 1/2 ln(2/3) + 1/2 ln 2
    = 1/2 ln(4/3) ~= 0.14384."""
    out = kd_loss(STUDENT, TEACHER, ONE, kind="reverse")
    assert_close(out.losses, t([0.5 * math.log(4 / 3)]))


def test_kd_jsd_hand_value():
    """beta = 1/2: M = [5/8, 3/8].
    KL(p_T || M) = 3/4 ln(6/5) + 1/4 ln(2/3); KL(p_S || M) = 1/2 ln(4/5) + 1/2 ln(4/3).
    JSD = (KL_T + KL_S) / 2 ~= 0.03382."""
    kl_t = 0.75 * math.log(6 / 5) + 0.25 * math.log(2 / 3)
    kl_s = 0.5 * math.log(4 / 5) + 0.5 * math.log(4 / 3)
    out = kd_loss(STUDENT, TEACHER, ONE, kind="jsd", jsd_beta=0.5)
    assert_close(out.losses, t([0.5 * kl_t + 0.5 * kl_s]))


def test_kd_jsd_bounds():
    """Identical distributions -> 0. Near-disjoint (p ~ [1, 0] vs [0, 1]): M ~ [1/2, 1/2] and
    each KL ~ ln 2, so JSD -> ln 2, its upper bound."""
    same = kd_loss(TEACHER, TEACHER, ONE, kind="jsd")
    assert_close(same.losses, t([0.0]), atol=1e-7, rtol=0)
    disjoint = kd_loss(t([[[-20.0, 20.0]]]), t([[[20.0, -20.0]]]), ONE, kind="jsd")
    assert_close(disjoint.losses, t([LN2]), atol=1e-6, rtol=0)
    assert disjoint.losses.item() <= LN2 + 1e-6


@pytest.mark.parametrize("beta", [0.1, 0.3, 0.5, 0.9])
def test_kd_jsd_general_beta_matches_plain_reference(beta):
    """Reference in probability space: M = b p_T + (1-b) p_S,
    b sum p_T ln(p_T / M) + (1-b) sum p_S ln(p_S / M), summed over masked positions."""
    g = torch.Generator().manual_seed(2)
    s, te = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    p_s, p_t = s.softmax(-1), te.softmax(-1)
    m = beta * p_t + (1 - beta) * p_s
    tok = beta * (p_t * (p_t / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1)
    expected = (tok * mask).sum(-1)
    out = kd_loss(s, te, mask, kind="jsd", jsd_beta=beta)
    assert_close(out.losses, expected, rtol=1e-5, atol=1e-6)
    assert_close(out.units, t([3.0, 3.0]))
    assert_close(out.metrics["kd"], expected / 3)


def test_kd_temperature_scaling():
    """tau = 2: teacher [2 ln 3, 0] / 2 = [ln 3, 0] -> p_T = [3/4, 1/4]; student [0, 0] / 2
    -> [1/2, 1/2]. Divergence at tau is the tau=1 example's; multiplied by tau^2 = 4:
    forward 4 ln 2, reverse 4 * 1/2 ln(4/3) = 2 ln(4/3)."""
    teacher = t([[[2 * LN3, 0.0]]])
    assert_close(kd_loss(STUDENT, teacher, ONE, temperature=2.0).losses, t([4 * LN2]))
    assert_close(
        kd_loss(STUDENT, teacher, ONE, kind="reverse", temperature=2.0).losses,
        t([2 * math.log(4 / 3)]),
    )
    assert_close(
        kd_loss(STUDENT, teacher, ONE, temperature=2.0).metrics["kl"], t([4 * (LN2 - H_T)])
    )


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_kd_masking_and_inf_logits(kind):
    """Position 0 is unmasked with a -inf logit in BOTH models at vocab 2 (p = 0 entries, like
    padded vocab rows): every 0 * log 0 term must be 0, so the loss equals the V=2 example.
    Position 1 is masked and each model puts -inf where the other has mass (infinite forward
    and reverse KL): it must contribute exactly 0 and no NaN gradient."""
    s = t([[[0.0, 0.0, -INF], [-INF, 0.0, 0.0]]], requires_grad=True)
    te = t([[[LN3, 0.0, -INF], [0.0, -INF, 0.0]]])
    mask = torch.tensor([[True, False]])
    out = kd_loss(s, te, mask, kind=kind)
    ref = kd_loss(STUDENT, TEACHER, ONE, kind=kind)
    assert_close(out.losses, ref.losses)
    assert_close(out.units, t([1.0]))
    out.losses.sum().backward()
    assert torch.isfinite(s.grad).all()
    assert (s.grad[0, 1] == 0).all()  # masked position: no gradient at all
    assert all(torch.isfinite(v).all() for v in out.metrics.values())


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_kd_grad_flows_to_student_only(kind):
    """The teacher is detached inside kd_loss: its logits get no .grad even if they require it."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 5, generator=g).requires_grad_()
    te = torch.randn(2, 3, 5, generator=g).requires_grad_()
    out = kd_loss(s, te, torch.ones(2, 3, dtype=torch.bool), kind=kind)
    assert not any(v.requires_grad for v in out.metrics.values())
    out.losses.sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert te.grad is None


@pytest.mark.parametrize(
    "kwargs", [dict(kind="tvd"), dict(temperature=0.0), dict(kind="jsd", jsd_beta=0.0),
               dict(kind="jsd", jsd_beta=1.0)]
)
def test_kd_validation(kwargs):
    with pytest.raises(ValueError):
        kd_loss(STUDENT, TEACHER, ONE, **kwargs)


def test_kd_forward_gradient_equals_forward_kl_gradient():
    """CE and KL(p_T || p_S) differ by H(p_T), constant in the student: same gradient,
    which for logits is p_S - p_T (tau = 1)."""
    g = torch.Generator().manual_seed(4)
    s = torch.randn(1, 2, 4, generator=g).requires_grad_()
    te = torch.randn(1, 2, 4, generator=g)
    kd_loss(s, te, torch.ones(1, 2, dtype=torch.bool)).losses.sum().backward()
    assert_close(s.grad, s.detach().softmax(-1) - te.softmax(-1))


# --------------------------------------------------------------------------- reduction contract


def test_reduction_contract_microbatches_equal_full_batch():
    """8 examples with ragged masks. Full batch: L = sum(losses) / sum(units) (token mean).
    Micro-batches of 2, each back-propagating losses.sum() / global_units (units counted
    up front), accumulate exactly the same value and gradient: 4 x 2 == 1 x 8."""
    g = torch.Generator().manual_seed(5)
    B, T, V = 8, 6, 7
    student = torch.randn(B, T, V, generator=g)
    teacher = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    for b in range(B):  # ragged prompt lengths, one example with a single response token
        labels[b, : 1 + b % 5] = -100
    labels[7, :-1] = -100

    def objectives(logits, lab, te):
        logps, mask = token_logprobs(logits, lab)
        return [sft_loss(logps, mask), kd_loss(logits[:, :-1], te[:, :-1], next_token_mask(lab))]

    full = student.clone().requires_grad_()
    outs = objectives(full, labels, teacher)
    total = sum(o.losses.sum() / o.units.sum() for o in outs)
    total.backward()

    # The full-batch value is the global token mean, not a mean of per-example means.
    token_nll = -token_logprobs(student, labels)[0].sum() / next_token_mask(labels).sum()
    assert_close(outs[0].losses.sum() / outs[0].units.sum(), token_nll)

    global_units = [o.units.sum() for o in outs]
    micro = student.clone().requires_grad_()
    acc = torch.zeros(())
    for i in range(0, B, 2):
        mb = objectives(micro[i : i + 2], labels[i : i + 2], teacher[i : i + 2])
        step = sum(o.losses.sum() / n for o, n in zip(mb, global_units))
        step.backward()
        acc = acc + step.detach()
    assert_close(acc, total.detach())
    assert_close(micro.grad, full.grad)

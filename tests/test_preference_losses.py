"""Preference losses beyond DPO/IPO: hinge, robust, APO, SimPO, ORPO, KTO.

Expected values are derived by hand in each docstring, then checked with assert_close. ``s`` is
the logistic sigmoid; useful values: s(1) = 0.731059, s(-1) = 0.268941, s(0.5) = 0.622459,
s(-0.5) = 0.377541, -log s(1) = ln(1 + e^-1) = 0.313262, -log s(-1) = ln(1 + e) = 1.313262.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from bipost.objectives import (
    DPOLoss,
    dpo_loss,
    kto_kl_sums,
    kto_loss,
    kto_reference_point,
    orpo_loss,
    simpo_loss,
)
from bipost.objectives.orpo import log1mexp

LN2, LN3 = math.log(2.0), math.log(3.0)


def t(x, **kw) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32, **kw)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def nls(x: float) -> float:
    """-log s(x) = log(1 + e^-x), written to not overflow for very negative x."""
    return max(-x, 0.0) + math.log1p(math.exp(-abs(x)))


def grads(out, *tensors):
    """d(sum of losses) / d(each tensor)."""
    return torch.autograd.grad(out.losses.sum(), tensors)


def assert_detached_metrics(out, n):
    assert all(not v.requires_grad and v.shape == (n,) for v in out.metrics.values())
    assert_close(out.units, torch.ones(n))


# --------------------------------------------------------------------------- DPO family

# pi_c = -10, pi_r = -12, ref_c = ref_r = -11  =>  r_c = 1, r_r = -1, h = r_c - r_r = 2.
PAIR = dict(
    policy_chosen_logps=t([-10.0]),
    policy_rejected_logps=t([-12.0]),
    ref_chosen_logps=t([-11.0]),
    ref_rejected_logps=t([-11.0]),
)


def pair_with_grad(pc=-10.0, pr=-12.0, rc=-11.0, rr=-11.0):
    pc, pr = t([pc], requires_grad=True), t([pr], requires_grad=True)
    return pc, pr, t([rc]), t([rr])


def test_hinge_hand_values_and_gradient():
    """max(0, 1 - beta h) with h = 2:
    beta = 0.25 -> 1 - 0.5 = 0.5; beta = 0.1 -> 1 - 0.2 = 0.8; beta = 1 -> max(0, -1) = 0.
    Inside the margin (beta h < 1) dL/dpi_c = -beta and dL/dpi_r = +beta; outside both are 0."""
    assert_close(dpo_loss(**PAIR, beta=0.25, loss_type="hinge").losses, t([0.5]))
    assert_close(dpo_loss(**PAIR, beta=0.1, loss_type=DPOLoss.HINGE).losses, t([0.8]))
    assert_close(dpo_loss(**PAIR, beta=1.0, loss_type="hinge").losses, t([0.0]))

    pc, pr, rc, rr = pair_with_grad()
    g_c, g_r = grads(dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="hinge"), pc, pr)
    assert_close((g_c, g_r), (t([-0.25]), t([0.25])))
    g_c, g_r = grads(dpo_loss(pc, pr, rc, rr, beta=1.0, loss_type="hinge"), pc, pr)
    assert_close((g_c, g_r), (t([0.0]), t([0.0])))


def test_hinge_without_reference_is_scaled_slic():
    """SLiC's calibration loss is max(0, delta - (log pi(y_c) - log pi(y_r))). With ref = 0 the
    hinge is max(0, 1 - beta (pi_c - pi_r)) = beta * max(0, 1/beta - (pi_c - pi_r)): SLiC with
    delta = 1 / beta, times beta. beta = 0.25, pi_c - pi_r = 2: 0.25 * max(0, 4 - 2) = 0.5."""
    zero = t([0.0])
    out = dpo_loss(t([-10.0]), t([-12.0]), zero, zero, beta=0.25, loss_type="hinge")
    assert_close(out.losses, t([0.25 * max(0.0, 4.0 - 2.0)]))
    assert_close(out.losses, t([0.5]))


def test_robust_hand_value_and_gradient():
    """eps = 0.1, beta = 0.5, beta h = 1, l(x) = -log s(beta x):
    ((1 - eps) l(h) - eps l(-h)) / (1 - 2 eps) = (0.9 * 0.313262 - 0.1 * 1.313262) / 0.8
    = (0.281936 - 0.131326) / 0.8 = 0.188262.
    d/dh = (-(1 - eps) beta s(-beta h) - eps beta s(beta h)) / (1 - 2 eps)
    = (-0.9 * 0.5 * 0.268941 - 0.1 * 0.5 * 0.731059) / 0.8 = -0.196971 = dL/dpi_c = -dL/dpi_r."""
    out = dpo_loss(**PAIR, beta=0.5, loss_type="robust", label_smoothing=0.1)
    assert_close(out.losses, t([(0.9 * nls(1.0) - 0.1 * nls(-1.0)) / 0.8]))
    assert_close(out.losses, t([0.188262]), rtol=0, atol=1e-6)

    pc, pr, rc, rr = pair_with_grad()
    out = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="robust", label_smoothing=0.1)
    g_c, g_r = grads(out, pc, pr)
    dh = (-0.9 * 0.5 * sig(-1.0) - 0.1 * 0.5 * sig(1.0)) / 0.8
    assert_close((g_c, g_r), (t([dh]), t([-dh])))
    assert_close(g_c, t([-0.196971]), rtol=0, atol=1e-6)


def test_robust_limits_and_unbiasedness():
    """eps = 0: robust is plain DPO. For eps > 0 it is unbiased under label flips with rate eps:
    (1 - eps) L(h) + eps L(-h) = [(1-eps)^2 l(h) - eps(1-eps) l(-h) + eps(1-eps) l(-h)
    - eps^2 l(h)] / (1 - 2 eps) = l(h), the clean DPO loss; swapping chosen and rejected flips h.
    It can be negative: beta h = 10, eps = 0.1 -> (0.9 * 4.5e-5 - 0.1 * 10.0000454) / 0.8 < 0."""
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, generator=g) * 3 for _ in range(4))
    clean = dpo_loss(pc, pr, rc, rr, beta=0.3).losses
    assert_close(dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type="robust").losses, clean)
    eps = 0.2
    rob = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type="robust", label_smoothing=eps).losses
    flipped = dpo_loss(pr, pc, rr, rc, beta=0.3, loss_type="robust", label_smoothing=eps).losses
    assert_close((1 - eps) * rob + eps * flipped, clean)

    far = dpo_loss(t([0.0]), t([-20.0]), t([0.0]), t([0.0]), beta=0.5, loss_type="robust",
                   label_smoothing=0.1)
    assert_close(far.losses, t([(0.9 * nls(10.0) - 0.1 * nls(-10.0)) / 0.8]))
    assert far.losses.item() < 0


def test_apo_hand_values():
    """beta = 0.5, r_c = 1, r_r = -1, h = 2.
    apo_zero = s(-beta r_c) + s(beta r_r) = s(-0.5) + s(-0.5) = 2 * 0.377541 = 0.755081.
    apo_down = s(beta r_c) + s(-beta h) = s(0.5) + s(-1) = 0.622459 + 0.268941 = 0.891400.
    Metrics are dpo_loss's: reward_chosen = 0.5, reward_rejected = -0.5, margin 1, accuracy 1."""
    zero = dpo_loss(**PAIR, beta=0.5, loss_type="apo_zero")
    down = dpo_loss(**PAIR, beta=0.5, loss_type=DPOLoss.APO_DOWN)
    assert_close(zero.losses, t([2 * sig(-0.5)]))
    assert_close(zero.losses, t([0.755081]), rtol=0, atol=1e-6)
    assert_close(down.losses, t([sig(0.5) + sig(-1.0)]))
    assert_close(down.losses, t([0.891400]), rtol=0, atol=1e-6)
    m = zero.metrics
    assert_close((m["reward_chosen"], m["reward_rejected"]), (t([0.5]), t([-0.5])))
    assert_close((m["margin"], m["accuracy"]), (t([1.0]), t([1.0])))


def test_apo_at_the_reference_gradients():
    """Policy = reference (r_c = r_r = 0, symmetric): both losses are s(0) + s(0) = 1.
    s'(0) = 1/4. apo_zero: dL/dpi_c = -beta/4 (chosen up), dL/dpi_r = +beta/4 (rejected down).
    apo_down: dL/dpi_c = beta s'(0) - beta s'(0) = 0 (the anchor and the contrast cancel),
    dL/dpi_r = +beta/4. beta = 0.4 -> 0.1."""
    pc, pr, rc, rr = pair_with_grad(-11.0, -11.0, -11.0, -11.0)
    zero = dpo_loss(pc, pr, rc, rr, beta=0.4, loss_type="apo_zero")
    down = dpo_loss(pc, pr, rc, rr, beta=0.4, loss_type="apo_down")
    assert_close((zero.losses, down.losses), (t([1.0]), t([1.0])))
    assert_close(grads(zero, pc, pr), (t([-0.1]), t([0.1])))
    assert_close(grads(down, pc, pr), (t([0.0]), t([0.1])))


def test_apo_zero_symmetric_pair():
    """r_c = a, r_r = -a: apo_zero = s(-beta a) + s(-beta a) = 2 s(-beta a), for any a;
    a -> +inf gives 0 and a -> -inf gives 2 (the loss lies in [0, 2])."""
    a = t([-3.0, -0.5, 0.0, 0.7, 4.0])
    ref = torch.zeros(5)
    out = dpo_loss(a, -a, ref, ref, beta=0.5, loss_type="apo_zero")
    assert_close(out.losses, 2 * torch.sigmoid(-0.5 * a))
    assert (out.losses >= 0).all() and (out.losses <= 2).all()


def test_new_dpo_types_take_the_nll_term_and_detach_reference():
    """nll_coef 0.5 * chosen_nll 2.0 adds exactly 1.0 whatever the loss type; reference
    log-probs get no gradient; metrics are detached [B]; one unit per pair."""
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(4, generator=g).requires_grad_() for _ in range(4))
    for kind in ("hinge", "robust", "apo_zero", "apo_down"):
        base = dpo_loss(**PAIR, beta=0.5, loss_type=kind).losses
        out = dpo_loss(**PAIR, beta=0.5, loss_type=kind, chosen_nll=t([2.0]), nll_coef=0.5)
        assert_close(out.losses, base + 1.0)
        out = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type=kind)
        assert_detached_metrics(out, 4)
        g_pc, g_rc = torch.autograd.grad(out.losses.sum(), (pc, rc), allow_unused=True)
        assert g_pc is not None and g_rc is None


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge", "robust", "apo_zero", "apo_down"])
def test_dpo_family_extreme_logps_are_finite(kind):
    """Summed log-probs of long responses reach -1e4 and below; h = +-2e4 (and the log-ratios)
    saturate every loss, which must stay finite in value and gradient."""
    smooth = 0.1 if kind == "robust" else 0.0
    pc = t([-1e4, -1.0, -5e4, 0.0], requires_grad=True)
    pr = t([-1.0, -1e4, 0.0, -5e4], requires_grad=True)
    ref = t([-1.0, -1.0, -3e4, -3e4])
    out = dpo_loss(pc, pr, ref, ref, beta=0.1, loss_type=kind, label_smoothing=smooth)
    assert torch.isfinite(out.losses).all()
    g_c, g_r = grads(out, pc, pr)
    assert torch.isfinite(g_c).all() and torch.isfinite(g_r).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(loss_type="exo_pair"),
        dict(loss_type="hinge", label_smoothing=0.1),
        dict(loss_type="apo_zero", label_smoothing=0.1),
        dict(loss_type="apo_down", label_smoothing=0.1),
        dict(loss_type="robust", label_smoothing=0.5),
    ],
)
def test_dpo_family_validation(kwargs):
    """Unknown type; label_smoothing only for sigmoid/robust; robust's flip rate < 1/2."""
    with pytest.raises(ValueError):
        dpo_loss(**PAIR, **kwargs)


# --------------------------------------------------------------------------- SimPO

# chosen: sum -6 over 3 tokens -> m_c = -2; rejected: sum -12 over 4 tokens -> m_r = -3.
# On sums the gap is 6, on token means 1: SimPO only sees the latter.
SIMPO = dict(
    policy_chosen_logps=t([-6.0]),
    chosen_counts=torch.tensor([3]),
    policy_rejected_logps=t([-12.0]),
    rejected_counts=torch.tensor([4]),
)


def test_simpo_hand_value_and_metrics():
    """beta = 2, gamma = 1: z = beta (m_c - m_r) - gamma = 2 * 1 - 1 = 1,
    loss = -log s(1) = 0.313262. With eps = 0.1: 0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262.
    Rewards beta m: -4 and -6, margin 2, accuracy 1; logps_* are the sums."""
    out = simpo_loss(**SIMPO, beta=2.0, gamma=1.0)
    assert_close(out.losses, t([nls(1.0)]))
    assert_close(out.losses, t([0.313262]), rtol=0, atol=1e-6)
    m = out.metrics
    assert_close((m["reward_chosen"], m["reward_rejected"]), (t([-4.0]), t([-6.0])))
    assert_close((m["margin"], m["accuracy"]), (t([2.0]), t([1.0])))
    assert_close((m["logps_chosen"], m["logps_rejected"]), (t([-6.0]), t([-12.0])))
    assert_detached_metrics(out, 1)
    smoothed = simpo_loss(**SIMPO, beta=2.0, gamma=1.0, label_smoothing=0.1)
    assert_close(smoothed.losses, t([0.413262]), rtol=0, atol=1e-6)


def test_simpo_gradient():
    """dL/dz = -s(-z) = -s(-1) = -0.268941 at z = 1; dz/dsum_c = beta / n_c = 2/3 and
    dz/dsum_r = -beta / n_r = -1/2. So dL/dsum_c = -0.179294, dL/dsum_r = +0.134471."""
    pc, pr = t([-6.0], requires_grad=True), t([-12.0], requires_grad=True)
    out = simpo_loss(pc, torch.tensor([3]), pr, torch.tensor([4]), beta=2.0, gamma=1.0)
    g_c, g_r = grads(out, pc, pr)
    assert_close((g_c, g_r), (t([-sig(-1.0) * 2 / 3]), t([sig(-1.0) / 2])))
    assert_close((g_c, g_r), (t([-0.179294]), t([0.134471])), rtol=0, atol=1e-6)


def test_simpo_is_reference_free_length_normalized_dpo():
    """gamma = 0: SimPO is sigmoid DPO on token means with a zero reference. A margin gamma is a
    reference log-ratio gap of gamma / beta: -log s(beta (m_c - m_r - gamma/beta)) is DPO with
    ref_c - ref_r = gamma / beta. Label smoothing carries over the same way (cDPO)."""
    g = torch.Generator().manual_seed(2)
    counts_c, counts_r = (torch.randint(1, 50, (6,), generator=g) for _ in range(2))
    sums_c, sums_r = -torch.rand(6, generator=g) * counts_c, -torch.rand(6, generator=g) * counts_r
    m_c, m_r, zero = sums_c / counts_c, sums_r / counts_r, torch.zeros(6)
    beta, gamma = 2.5, 1.4
    out = simpo_loss(sums_c, counts_c, sums_r, counts_r, beta=beta, gamma=0.0)
    assert_close(out.losses, dpo_loss(m_c, m_r, zero, zero, beta=beta).losses)
    out = simpo_loss(sums_c, counts_c, sums_r, counts_r, beta=beta, gamma=gamma,
                     label_smoothing=0.2)
    ref = dpo_loss(m_c, m_r, zero + gamma / beta, zero, beta=beta, label_smoothing=0.2)
    assert_close(out.losses, ref.losses)


def test_simpo_gamma_conventions():
    """TRL's CPOTrainer(loss_type="simpo"): logits = (m_c - m_r) - simpo_gamma / beta, loss
    -log s(beta * logits) = -log s(beta (m_c - m_r) - simpo_gamma): simpo_gamma is our gamma.
    The SimPO authors' code: logits = (m_c - m_r) - gamma_beta_ratio: gamma = beta * ratio.
    Here m_c - m_r = 1, beta = 2: TRL simpo_gamma = 1 and ratio 0.5 both mean gamma = 1."""
    ours = simpo_loss(**SIMPO, beta=2.0, gamma=1.0).losses
    beta, diff = 2.0, 1.0
    trl = -F.logsigmoid(t([beta * (diff - 1.0 / beta)]))  # simpo_gamma = 1
    authors = -F.logsigmoid(t([beta * (diff - 0.5)]))  # gamma_beta_ratio = 0.5
    assert_close(ours, trl)
    assert_close(ours, authors)


def test_simpo_extreme_and_empty():
    """Means of +-1e6 saturate the sigmoid: finite values and gradients. An empty response
    (count 0) has no mean log-prob and is an error, not a NaN."""
    pc, pr = t([-1e6, 0.0], requires_grad=True), t([0.0, -1e6], requires_grad=True)
    one = torch.ones(2)
    out = simpo_loss(pc, one, pr, one, beta=10.0, gamma=5.0)
    assert torch.isfinite(out.losses).all()
    assert all(torch.isfinite(x).all() for x in grads(out, pc, pr))
    with pytest.raises(ValueError, match="token"):
        simpo_loss(t([-1.0]), torch.tensor([0]), t([-1.0]), torch.tensor([1]), beta=2.0, gamma=1.0)
    with pytest.raises(ValueError):
        simpo_loss(t([-1.0, -2.0]), torch.tensor([1]), t([-1.0]), torch.tensor([1]),
                   beta=2.0, gamma=1.0)


# --------------------------------------------------------------------------- ORPO

# chosen: sum -2 ln(4/3) over 2 tokens -> m_c = -ln(4/3), p_c = 3/4, odds 3, log odds ln 3;
# rejected: sum -3 ln 4 over 3 tokens -> m_r = -ln 4, p_r = 1/4, odds 1/3, log odds -ln 3.
# (m_c > -ln 2 and m_r < -ln 2: both branches of log1mexp are used.)
ORPO = dict(
    policy_chosen_logps=t([-2 * math.log(4 / 3)]),
    chosen_counts=torch.tensor([2]),
    policy_rejected_logps=t([-3 * math.log(4.0)]),
    rejected_counts=torch.tensor([3]),
)


def test_orpo_hand_value_and_metrics():
    """lor = ln 3 - (-ln 3) = ln 9; -log s(ln 9) = ln(1 + 1/9) = ln(10/9) = 0.105361.
    NLL = -m_c = ln(4/3) = 0.287682. lambda = 0.5: 0.287682 + 0.5 * 0.105361 = 0.340362.
    lambda = 0 leaves the chosen response's token-mean NLL (SFT on the chosen response)."""
    out = orpo_loss(**ORPO, lambda_=0.5)
    assert_close(out.losses, t([math.log(4 / 3) + 0.5 * math.log(10 / 9)]))
    assert_close(out.losses, t([0.340362]), rtol=0, atol=1e-6)
    m = out.metrics
    assert_close((m["nll"], m["log_odds_ratio"]), (t([math.log(4 / 3)]), t([math.log(9.0)])))
    assert_close(m["accuracy"], t([1.0]))
    assert_detached_metrics(out, 1)
    assert_close(orpo_loss(**ORPO, lambda_=0.0).losses, t([math.log(4 / 3)]))


def test_orpo_gradient():
    """d log odds / dm = 1 + e^m / (1 - e^m) = 1 / (1 - p). d(-log s(lor))/dlor = -s(-lor) = -1/10.
    dL/dm_c = -1 + lambda (-1/10) / (1 - 3/4) = -1 - 0.5 * 0.4 = -1.2, so dL/dsum_c = -1.2/2 = -0.6.
    dL/dm_r = lambda (1/10) / (1 - 1/4) = 0.5 * 0.1 * 4/3 = 1/15, so dL/dsum_r = 1/45 = 0.022222."""
    pc = ORPO["policy_chosen_logps"].clone().requires_grad_()
    pr = ORPO["policy_rejected_logps"].clone().requires_grad_()
    out = orpo_loss(pc, ORPO["chosen_counts"], pr, ORPO["rejected_counts"], lambda_=0.5)
    assert_close(grads(out, pc, pr), (t([-0.6]), t([1 / 45])))


def test_log1mexp_accuracy():
    """log(1 - e^x) in fp32 against float64 math over the whole range (the float64 reference
    itself needs log(-expm1(x)) near 0 and log1p(-exp(x)) far from it), including where the
    naive fp32 log(1 - exp(x)) loses everything (x = -1e-7: 1 - exp(x) rounds to 1.19e-7, not
    1e-7, a 17% error; x = -50: exp(x) vanishes against 1 and the naive form returns 0, not
    -1.9e-22)."""
    xs = [-1e-7, -1e-4, -0.3, -math.log(2.0), -0.7, -2.0, -20.0, -50.0, -1e4]
    expected = t([math.log(-math.expm1(x)) if x > -1 else math.log1p(-math.exp(x)) for x in xs])
    assert_close(log1mexp(t(xs)), expected, rtol=1e-6, atol=1e-30)
    naive = torch.log(1 - torch.exp(t([-1e-7])))
    assert abs(naive.item() - math.log(1e-7)) > 0.1


def test_orpo_extreme_logps_are_finite():
    """Mean log-probs of exactly 0 (every token certain; odds infinite, so capped at -eps), tiny
    (-1e-12), and -1e4, in every combination: finite losses and gradients. Both at 0: lor = 0 and
    the loss is 0 + lambda ln 2. Chosen -1e4 vs rejected 0: lor ~ -1e4 - 15.9, the loss ~ 1e4 +
    lambda (1e4 + 15.9)."""
    vals = [0.0, -1e-12, -1e4]
    pairs = [(a, b) for a in vals for b in vals]
    pc = t([a for a, _ in pairs], requires_grad=True)
    pr = t([b for _, b in pairs], requires_grad=True)
    one = torch.ones(len(pairs))
    out = orpo_loss(pc, one, pr, one, lambda_=0.5)
    assert torch.isfinite(out.losses).all()
    assert all(torch.isfinite(x).all() for x in grads(out, pc, pr))
    assert_close(out.losses[0], t(0.5 * LN2))
    cap = torch.finfo(torch.float32).eps
    lor = -1e4 - (-cap - math.log(cap))
    assert_close(out.losses[6], t(1e4 + 0.5 * nls(lor)))


# --------------------------------------------------------------------------- KTO


def test_kto_hand_values_and_gradients():
    """beta = 0.5, z0 = 0.5, w_D = 1, w_U = 2.
    Desirable row: pi = -10, ref = -11.5 -> r = 1.5, beta (r - z0) = 0.5,
    loss w_D (1 - s(0.5)) = s(-0.5) = 0.377541; dL/dpi = -w_D beta s(0.5) s(-0.5) = -0.117502.
    Undesirable row: pi = -13, ref = -11.5 -> r = -1.5, beta (r - z0) = -1,
    loss w_U (1 - s(beta (z0 - r))) = 2 s(-1) = 0.537883; dL/dpi = w_U beta s(-1) s(1) = 0.196612.
    Metrics: reward = beta r = [0.75, -0.75]; both rows on their label's side of z0."""
    pi = t([-10.0, -13.0], requires_grad=True)
    out = kto_loss(pi, t([-11.5, -11.5]), torch.tensor([True, False]), t(0.5),
                   beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
    assert_close(out.losses, t([sig(-0.5), 2 * sig(-1.0)]))
    assert_close(out.losses, t([0.377541, 0.537883]), rtol=0, atol=1e-6)
    (g,) = grads(out, pi)
    assert_close(g, t([-0.5 * sig(0.5) * sig(-0.5), 2 * 0.5 * sig(-1.0) * sig(1.0)]))
    assert_close(g, t([-0.117502, 0.196612]), rtol=0, atol=1e-6)
    m = out.metrics
    assert_close(m["reward"], t([0.75, -0.75]))
    assert_close(m["accuracy"], t([1.0, 1.0]))
    assert_close((m["desirable"], m["z0"]), (t([1.0, 0.0]), t([0.5, 0.5])))
    assert_detached_metrics(out, 2)


def test_kto_with_zero_reference_point_is_apo_zero_on_split_pairs():
    """z0 = 0, unit weights: desirable rows lose s(-beta r_c), undesirable rows s(beta r_r);
    a preference pair split into two rows sums to s(-beta r_c) + s(beta r_r) = apo_zero."""
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (torch.randn(5, generator=g) * 4 for _ in range(4))
    out = kto_loss(torch.cat([pc, pr]), torch.cat([rc, rr]),
                   torch.tensor([True] * 5 + [False] * 5), 0.0, beta=0.3)
    apo = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type="apo_zero").losses
    assert_close(out.losses[:5] + out.losses[5:], apo)


def test_kto_reference_point_hand_values_and_detached():
    """KL estimates pi - ref: [-3, -5, -4, -6] - [-5, -5, -5, -5] = [2, 0, 1, -1]: sum 2,
    count 4, z0 = max(0, 0.5) = 0.5. Against ref -4: [1, -1, 0, -2], mean -0.5 -> z0 = 0.
    z0 carries no gradient, neither from the KL inputs nor into kto_loss."""
    pol = t([-3.0, -5.0, -4.0, -6.0], requires_grad=True)
    s, n = kto_kl_sums(pol, t([-5.0] * 4))
    assert_close((s, n), (t(2.0), t(4.0)))
    z0 = kto_reference_point(s, n)
    assert_close(z0, t(0.5))
    assert not z0.requires_grad
    assert_close(kto_reference_point(*kto_kl_sums(pol, t([-4.0] * 4))), t(0.0))

    z0_leaf = t(0.5, requires_grad=True)
    pi = t([-1.0], requires_grad=True)
    out = kto_loss(pi, t([-2.0]), torch.tensor([True]), z0_leaf, beta=0.1)
    out.losses.sum().backward()
    assert z0_leaf.grad is None


def test_kto_step_reference_point_is_layout_free_unlike_trl():
    """Eight KL estimates [1, 1, -1, -1, 3, 1, -2, -2] (pi - ref, ref = 0): mean 0 -> z0 = 0.
    bipost adds (sum, count) over micro-batches and ranks: micro-batch 8; 4 micro-batches of 2;
    2 ranks x 2 micro-batches of 2 -- all give sum 0, count 8, z0 = 0, hence identical losses.
    TRL's per-micro-batch z0 (mean over the micro-batch, clamped) gives [1, 0, 2, 0] for
    micro-batches of 2: a different reference point per micro-batch."""
    kl = t([1.0, 1.0, -1.0, -1.0, 3.0, 1.0, -2.0, -2.0])
    zero = torch.zeros(8)
    whole = kto_reference_point(*kto_kl_sums(kl, zero))
    parts = [kto_kl_sums(kl[i:i + 2], zero[i:i + 2]) for i in range(0, 8, 2)]
    accum = kto_reference_point(sum(p[0] for p in parts), sum(p[1] for p in parts))
    rank_sums = [parts[0][0] + parts[1][0], parts[2][0] + parts[3][0]]  # all-reduce(SUM)
    rank_counts = [parts[0][1] + parts[1][1], parts[2][1] + parts[3][1]]
    ranks = kto_reference_point(sum(rank_sums), sum(rank_counts))
    assert_close((whole, accum, ranks), (t(0.0), t(0.0), t(0.0)))
    trl = [kl[i:i + 2].mean().clamp(min=0).item() for i in range(0, 8, 2)]
    assert trl == [1.0, 0.0, 2.0, 0.0]

    # Same z0 everywhere + the reduction contract: the step loss is layout-free.
    g = torch.Generator().manual_seed(4)
    pi, ref = torch.randn(8, generator=g), torch.randn(8, generator=g)
    lab = torch.tensor([True, False] * 4)
    full = kto_loss(pi, ref, lab, whole, beta=0.2)
    split = [kto_loss(pi[i:i + 2], ref[i:i + 2], lab[i:i + 2], accum, beta=0.2)
             for i in range(0, 8, 2)]
    assert_close(sum(o.losses.sum() for o in split) / sum(o.units.sum() for o in split),
                 full.losses.sum() / full.units.sum())


def test_kto_extreme_logps_are_finite():
    """Log-ratios of +-1e4 saturate the sigmoid to exactly 0 or 1: finite values and gradients."""
    pi = t([-1e4, 0.0, -1e4, 0.0], requires_grad=True)
    ref = t([0.0, -1e4, 0.0, -1e4])
    out = kto_loss(pi, ref, torch.tensor([True, True, False, False]), 3.0, beta=0.1)
    assert_close(out.losses, t([1.0, 0.0, 0.0, 1.0]))
    assert torch.isfinite(grads(out, pi)[0]).all()


@pytest.mark.parametrize(
    "args",
    [
        (t([-1.0]), t([-1.0]), torch.tensor([1]), 0.0),  # labels not bool
        (t([-1.0, -2.0]), t([-1.0]), torch.tensor([True, False]), 0.0),  # shapes differ
        (t([-1.0]), t([-1.0]), torch.tensor([True]), t([0.0, 1.0])),  # z0 not a scalar
    ],
)
def test_kto_validation(args):
    with pytest.raises(ValueError):
        kto_loss(*args, beta=0.1)


def test_kto_reference_point_needs_pairs():
    with pytest.raises(ValueError):
        kto_reference_point(*kto_kl_sums(torch.zeros(0), torch.zeros(0)))
    with pytest.raises(ValueError):
        kto_kl_sums(torch.zeros(2), torch.zeros(3))

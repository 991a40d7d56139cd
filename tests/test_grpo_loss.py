"""GRPO advantages and losses (objectives/grpo.py): values derived by hand in the docstrings,
the REINFORCE-with-baseline gradient at num_iterations = 1, and the reduction contract (the loop's
global normalization over micro-batches gives each variant's exact value)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from bipost.objectives import GRPOLoss, group_advantages, grpo_loss, grpo_units
from bipost.objectives.grpo import k3_kl

LN2 = math.log(2.0)


def t(x, **kw) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32, **kw)


# --------------------------------------------------------------------------- advantages


def test_group_advantages_by_hand():
    """Three groups of n = 4 (epsilon = 0 to keep the numbers exact):

    * [1, 0, 0, 1]: mean 1/2, unbiased var = 4 * (1/2)^2 / 3 = 1/3, std = 1/sqrt(3);
      A = +-(1/2) * sqrt(3) = +-sqrt(3)/2.
    * [2, 2, 2, 2]: all equal -> degenerate, A = 0, std reported as 0.
    * [3, 1, 2, 2]: mean 2, deviations [1, -1, 0, 0], var = 2/3, std = sqrt(2/3);
      A = [sqrt(3/2), -sqrt(3/2), 0, 0].
    ``scale="none"`` (Dr. GRPO) keeps the deviations: [.5, -.5, -.5, .5, 0 x4, 1, -1, 0, 0].
    """
    r = t([1, 0, 0, 1, 2, 2, 2, 2, 3, 1, 2, 2])
    out = group_advantages(r, 4, epsilon=0.0)
    h, k = math.sqrt(3) / 2, math.sqrt(1.5)
    assert_close(out.advantages, t([h, -h, -h, h, 0, 0, 0, 0, k, -k, 0, 0]))
    assert_close(out.group_mean, t([0.5, 2.0, 2.0]))
    assert_close(out.group_std, t([1 / math.sqrt(3), 0.0, math.sqrt(2 / 3)]))
    assert out.degenerate.tolist() == [False, True, False]

    none = group_advantages(r, 4, scale="none")
    assert_close(none.advantages, t([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 1, -1, 0, 0]))


def test_group_advantages_epsilon_and_exact_zero_in_degenerate_groups():
    """epsilon enters as A = (r - mu) / (std + eps): group [1, 0] has std sqrt(1/2), so
    A = +-0.5 / (sqrt(0.5) + 0.1). A group of three 0.1 rewards has a float mean that need not equal
    0.1 exactly; divided by eps = 1e-4 the residue would be a large spurious advantage: it is 0."""
    out = group_advantages(t([1.0, 0.0]), 2, epsilon=0.1)
    a = 0.5 / (math.sqrt(0.5) + 0.1)
    assert_close(out.advantages, t([a, -a]))
    same = group_advantages(t([0.1, 0.1, 0.1]), 3)
    assert same.advantages.tolist() == [0.0, 0.0, 0.0] and same.degenerate.tolist() == [True]


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        group_advantages(t([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match=r"rewards must be \[G \* num_generations\]"):
        group_advantages(t([1.0, 2.0, 3.0]), 2)
    with pytest.raises(ValueError, match="reward 1 is nan"):
        group_advantages(t([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="unknown advantage scale 'batch'"):
        group_advantages(t([1.0, 2.0]), 2, scale="batch")


# --------------------------------------------------------------------------- loss variants


def _variant_batch():
    """Two completions: s0 has 3 tokens, s1 one token; A = [1, -0.5]."""
    logps = t([-0.3, -1.2, -0.7, -2.0], requires_grad=True)
    seq = torch.tensor([0, 0, 0, 1])
    return logps, seq, t([1.0, -0.5])


@pytest.mark.parametrize(
    "loss_type, losses, units, step_value, grad",
    [
        # grpo: per-token loss is -A (ratio 1): s0 -> mean(-1, -1, -1) = -1 (1 unit), s1 -> 0.5 (1 unit).
        # Step value (-1 + 0.5) / 2 = -0.25. d/d logp_t = -A_s / (|s| * S): -1/6 on s0, 0.5/2 = 0.25 on s1.
        ("grpo", [-1.0, 0.5], [1.0, 1.0], -0.25, [-1 / 6, -1 / 6, -1 / 6, 0.25]),
        # dapo: sums -3 and 0.5 over 3 and 1 tokens: -2.5 / 4 = -0.625; grad -A / 4.
        ("dapo", [-3.0, 0.5], [3.0, 1.0], -0.625, [-0.25, -0.25, -0.25, 0.125]),
        # dr_grpo with L = 4: sums -3 and 0.5 over 2 * 4 slots: -2.5 / 8 = -0.3125; grad -A / 8.
        ("dr_grpo", [-3.0, 0.5], [4.0, 4.0], -0.3125, [-0.125, -0.125, -0.125, 0.0625]),
    ],
)
def test_loss_variants_by_hand(loss_type, losses, units, step_value, grad):
    """num_iterations = 1 (old_logps=None): ratio = exp(logp - logp.detach()) = 1, so no clipping and
    the per-token loss is -A whatever the log-probs; the variants differ only in units."""
    logps, seq, adv = _variant_batch()
    out = grpo_loss(logps, seq, 2, adv, loss_type=loss_type, max_completion_length=4)
    assert_close(out.losses, t(losses))
    assert_close(out.units, t(units))
    total = out.losses.sum() / out.units.sum()
    assert_close(total, t(step_value))
    total.backward()
    assert_close(logps.grad, t(grad))
    assert_close(out.metrics["completion_length"], t([3.0, 1.0]))
    assert_close(out.metrics["ratio"], t([1.0, 1.0]))
    assert_close(out.metrics["clip_region"], t([0.0, 0.0]))
    assert "kl" not in out.metrics
    assert_close(grpo_units(loss_type, t([3.0, 1.0]), 4), t(units))


def _tiny_policy(seed: int = 0):
    """A linear 'model' over fixed hidden states: logp_t = log_softmax(W h_t)[y_t]."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(7, 5, generator=g, requires_grad=True)
    h = torch.randn(12, 5, generator=g)
    y = torch.randint(0, 7, (12,), generator=g)
    seq = torch.tensor([0, 0, 1, 1, 1, 1, 2, 3, 3, 3, 4, 5])  # S = 6, lengths 2, 4, 1, 3, 1, 1
    return w, h, y, seq


def _logps(w, h, y):
    return torch.log_softmax(h @ w.t(), dim=-1).gather(1, y[:, None]).squeeze(1)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_num_iterations_one_is_reinforce_with_baseline(loss_type):
    """With old = logp.detach() the gradient is REINFORCE's with the group baseline:

        grad = -sum_s A_s / norm_s * sum_{t in s} grad log pi(y_t)

    with norm_s = |s| * S (grpo), sum_s |s| (dapo), S * L (dr_grpo). Checked on the parameters of
    a tiny linear policy against autograd of that surrogate."""
    w, h, y, seq = _tiny_policy()
    rewards = t([1.0, 0.0, 0.5, 0.0, 2.0, 1.0])  # 3 groups of n = 2
    adv = group_advantages(rewards, 2).advantages
    L = 5
    out = grpo_loss(_logps(w, h, y), seq, 6, adv, loss_type=loss_type, max_completion_length=L)
    (g_loss,) = torch.autograd.grad(out.losses.sum() / out.units.sum(), w)

    lengths = torch.bincount(seq, minlength=6).float()
    norm = {"grpo": lengths * 6, "dapo": lengths.sum().expand(6), "dr_grpo": torch.full((6,), 6.0 * L)}[loss_type]
    surrogate = -(adv[seq] / norm[seq] * _logps(w, h, y)).sum()
    (g_ref,) = torch.autograd.grad(surrogate, w)
    assert_close(g_loss, g_ref)
    assert g_ref.abs().sum() > 0


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_micro_batches_reproduce_the_global_value_and_gradient(loss_type):
    """The loop's contract: micro-batches' summed losses divided by the step's global units (counted
    up front) add up to the whole batch's value and gradient, for every variant — including grpo,
    whose per-sequence mean would be wrong if micro-batch means were averaged instead."""
    w, h, y, seq = _tiny_policy(1)
    adv = t([0.7, -0.7, 1.1, -1.1, 0.0, 0.0])
    old = (_logps(w, h, y) + 0.3 * torch.sin(torch.arange(12.0))).detach()  # ratios away from 1: clipping active
    kw = dict(loss_type=loss_type, max_completion_length=4, epsilon_high=0.28)
    whole = grpo_loss(_logps(w, h, y), seq, 6, adv, old_logps=old, **kw)
    assert whole.metrics["clip_region"].sum() > 0
    value = whole.losses.sum() / whole.units.sum()
    (g_whole,) = torch.autograd.grad(value, w)

    global_units = whole.units.sum()
    parts, acc = [], torch.zeros_like(w)
    for seqs in ([0, 1], [2, 3, 4, 5]):  # two micro-batches of whole completions
        keep = torch.isin(seq, torch.tensor(seqs))
        local = torch.searchsorted(torch.tensor(seqs), seq[keep])
        out = grpo_loss(_logps(w, h, y)[keep], local, len(seqs), adv[seqs], old_logps=old[keep], **kw)
        part = out.losses.sum() / global_units
        acc += torch.autograd.grad(part, w)[0]
        parts.append(part.detach())
    assert_close(sum(parts), value.detach())
    assert_close(acc, g_whole)


# --------------------------------------------------------------------------- clipping and KL


def test_clipped_ratio_with_old_logps_by_hand():
    """Four one-token completions, old log-probs 0, epsilon_low 0.2, epsilon_high 0.28 (clip-higher):

    | s | ratio | A  | -min(r A, clip(r) A)          | d/d logp (= -A r unless clipped) | clipped |
    | 0 | 1.5   | +1 | -min(1.5, 1.28) = -1.28        | 0                                | high    |
    | 1 | 0.5   | +1 | -min(0.5, 0.8)  = -0.5         | -0.5                             | -       |
    | 2 | 0.5   | -1 | -min(-0.5, -0.8) = 0.8         | 0                                | low     |
    | 3 | 1.5   | -1 | -min(-1.5, -1.28) = 1.5        | 1.5                              | -       |

    (d ratio / d logp = ratio.) With epsilon_high = None (symmetric 0.2), s0 gives -1.2."""
    logps = t([math.log(1.5), math.log(0.5), math.log(0.5), math.log(1.5)], requires_grad=True)
    seq, adv, old = torch.arange(4), t([1.0, 1.0, -1.0, -1.0]), torch.zeros(4)
    out = grpo_loss(logps, seq, 4, adv, old_logps=old, epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo")
    assert_close(out.losses, t([-1.28, -0.5, 0.8, 1.5]))
    out.losses.sum().backward()
    assert_close(logps.grad, t([0.0, -0.5, 0.0, 1.5]))
    m = out.metrics
    assert_close(m["ratio"], t([1.5, 0.5, 0.5, 1.5]))
    assert m["clip_high"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert m["clip_low"].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert m["clip_region"].tolist() == [1.0, 0.0, 1.0, 0.0]

    sym = grpo_loss(logps.detach(), seq, 4, adv, old_logps=old, loss_type="dapo")
    assert_close(sym.losses, t([-1.2, -0.5, 0.8, 1.5]))


def test_ratio_stats_per_completion():
    """One completion of three tokens with ratios 2, 1/2, 1 (logp - old = ln 2, -ln 2, 0): token mean
    7/6, min 1/2, max 2; a completion with no token reports ratio stats 1 and length 0."""
    logps = t([LN2, -LN2, 0.0])
    out = grpo_loss(logps, torch.zeros(3, dtype=torch.long), 2, t([0.0, 0.0]), old_logps=torch.zeros(3))
    assert_close(out.metrics["ratio"], t([7 / 6, 0.0]))
    assert_close(out.metrics["ratio_min"], t([0.5, 1.0]))
    assert_close(out.metrics["ratio_max"], t([2.0, 1.0]))
    assert_close(out.metrics["completion_length"], t([3.0, 0.0]))
    assert_close(out.units, t([1.0, 1.0]))  # grpo: an empty completion still counts one unit (as in TRL)


def test_k3_kl_by_hand():
    """k3 = exp(d) - d - 1 with d = ref - logp:
    logp = ln 1/2, ref = ln 1/4: d = -ln 2, k3 = 1/2 + ln 2 - 1 = ln 2 - 1/2;
    logp = ln 1/4, ref = ln 1/2: d = +ln 2, k3 = 2 - ln 2 - 1 = 1 - ln 2;
    logp = ref: k3 = 0. d k3 / d logp = 1 - exp(d): [1/2, -1, 0]. With A = 0 and beta = 0.1 the
    dapo loss of one-token completions is beta * k3 and its gradient beta * (1 - exp(d))."""
    logps = t([math.log(0.5), math.log(0.25), math.log(0.5)], requires_grad=True)
    ref = t([math.log(0.25), math.log(0.5), math.log(0.5)])
    k3 = t([LN2 - 0.5, 1 - LN2, 0.0])
    assert_close(k3_kl(logps, ref), k3)
    out = grpo_loss(logps, torch.arange(3), 3, torch.zeros(3), ref_logps=ref, beta=0.1, loss_type="dapo")
    assert_close(out.losses, 0.1 * k3)
    assert_close(out.metrics["kl"], k3)
    out.losses.sum().backward()
    assert_close(logps.grad, t([0.05, -0.1, 0.0]))


def test_k3_is_zero_with_zero_gradient_at_the_reference():
    x = torch.randn(5, requires_grad=True)
    kl = k3_kl(x, x.detach())
    assert kl.tolist() == [0.0] * 5
    kl.sum().backward()
    assert x.grad.tolist() == [0.0] * 5


def test_beta_zero_needs_no_reference_and_refuses_one():
    """beta = 0: no reference at all (ref_logps=None works, no kl metric); a reference passed anyway
    is an error (its forward would be wasted). beta > 0 without one is an error too."""
    logps, seq, adv = _variant_batch()
    out = grpo_loss(logps, seq, 2, adv, beta=0.0)
    assert "kl" not in out.metrics
    with pytest.raises(ValueError, match="beta = 0 takes no ref_logps"):
        grpo_loss(logps, seq, 2, adv, beta=0.0, ref_logps=torch.zeros(4))
    with pytest.raises(ValueError, match="beta > 0 needs ref_logps"):
        grpo_loss(logps, seq, 2, adv, beta=0.04)


def test_loss_argument_errors():
    logps, seq, adv = _variant_batch()
    with pytest.raises(ValueError, match="unknown GRPO loss_type 'bnpo'"):
        grpo_loss(logps, seq, 2, adv, loss_type="bnpo")
    with pytest.raises(ValueError, match="'dr_grpo' needs max_completion_length"):
        grpo_loss(logps, seq, 2, adv, loss_type=GRPOLoss.DR_GRPO)
    with pytest.raises(ValueError, match=r"advantages has shape \(3,\), expected \(2,\)"):
        grpo_loss(logps, seq, 2, torch.zeros(3))
    with pytest.raises(ValueError, match="old_logps has shape"):
        grpo_loss(logps, seq, 2, adv, old_logps=torch.zeros(3))
    with pytest.raises(ValueError, match="epsilon_low must be in"):
        grpo_loss(logps, seq, 2, adv, epsilon_low=1.0)


def test_empty_micro_batch_backpropagates_zero():
    """No completion token at all (as the chunked path returns it: a 0-length tensor still connected
    to the graph): zero losses, grpo units still one per completion."""
    w = torch.ones(3, requires_grad=True)
    logps = (w.sum() * 0.0).expand(0)
    out = grpo_loss(logps, torch.zeros(0, dtype=torch.long), 2, t([1.0, -1.0]))
    assert out.losses.tolist() == [0.0, 0.0] and out.units.tolist() == [1.0, 1.0]
    out.losses.sum().backward()
    assert w.grad.tolist() == [0.0, 0.0, 0.0]

"""Schedules: the strategy objects alone (fast, no model), then their equivalences in the real loop."""

from __future__ import annotations

import math
import random
import shutil

import pytest
import torch

from bipost.config import ObjectiveConfig, ScheduleConfig
from bipost.schedules import make_schedule
from bipost.schedules.alright import Alright
from bipost.schedules.maxright import Maxright
from bipost.schedules.simple import Sequential
from bipost.run import build_trainer, train

from helpers import config


def objectives(*weights: float, optima=None) -> list[ObjectiveConfig]:
    optima = optima or [None] * len(weights)
    return [ObjectiveConfig(kind="sft", name=f"o{i + 1}", weight=w, optimum=f, batch_size=8, micro_batch_size=8)
            for i, (w, f) in enumerate(zip(weights, optima))]


def picks(schedule, steps: int, probe=None) -> list[str]:
    probe = probe or (lambda names: {n: 1.0 for n in names})
    return [next(iter(schedule.plan(s, probe).weights)) for s in range(steps)]


# ------------------------------------------------------------------------------ ALRIGHT

def test_alright_draw_frequency_matches_lambda():
    """20 000 draws at lambda = (0.3, 0.7): the share of o1 is within 4 binomial standard
    deviations (4 * sqrt(0.3 * 0.7 / 20000) = 0.013) of 0.3."""
    s = Alright(objectives(0.3, 0.7), ScheduleConfig(name="alright", seed=5), 20_000)
    share = picks(s, 20_000).count("o1") / 20_000
    assert abs(share - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 20_000)


def test_alright_draws_agree_across_instances_and_ignore_global_rng():
    """Two schedules with the same seed (two ranks) draw the same sequence even when one process
    uses the global RNGs in between (dropout, data order, numpy); another seed draws differently."""
    a = Alright(objectives(0.5, 0.5), ScheduleConfig(name="alright", seed=3), 200)
    b = Alright(objectives(0.5, 0.5), ScheduleConfig(name="alright", seed=3), 200)
    seq_a = []
    for step in range(200):
        torch.rand(7), random.random(), torch.manual_seed(step)  # what other code on "rank 0" might do
        seq_a.append(next(iter(a.plan(step, None).weights)))
    assert seq_a == picks(b, 200)
    assert seq_a != picks(Alright(objectives(0.5, 0.5), ScheduleConfig(name="alright", seed=4), 200), 200)


def test_alright_state_dict_continues_the_sequence():
    a = Alright(objectives(0.4, 0.6), ScheduleConfig(name="alright", seed=1), 100)
    picks(a, 37)
    b = Alright(objectives(0.4, 0.6), ScheduleConfig(name="alright", seed=1), 100)
    b.load_state_dict(a.state_dict())
    assert picks(a, 50) == picks(b, 50)


def test_alright_per_micro_step_shares_the_slots():
    """Per-micro-step draws: one draw per accumulation slot; weights are the slot shares."""
    objs = objectives(0.5, 0.5)
    for o in objs:
        o.batch_size, o.micro_batch_size = 8, 2  # 4 slots
    s = Alright(objs, ScheduleConfig(name="alright", seed=0, per_micro_step=True), 10)
    for step in range(20):
        plan = s.plan(step, None)
        assert sum(plan.micro_batches.values()) == 4 == s.slots
        assert plan.weights == {n: c / 4 for n, c in plan.micro_batches.items()}


# ------------------------------------------------------------------------------ MAXRIGHT

def test_maxright_picks_the_largest_weighted_gap():
    """Known optima: gaps lambda_i (f_i - f_i*) = 0.25 (3 - 1) = 0.5 and 0.75 (1.5 - 0.5) = 0.75 -> o2;
    after o2 runs with loss 0.8 its gap is 0.75 * 0.3 = 0.225 < 0.5 -> o1."""
    s = Maxright(objectives(0.25, 0.75, optima=[1.0, 0.5]), ScheduleConfig(name="maxright", max_eval_steps=10), 50)
    plan = s.plan(0, lambda names: {"o1": 3.0, "o2": 1.5})
    assert plan.weights == {"o2": 1.0} and plan.probed == {"o1": 3.0, "o2": 1.5}
    assert s.last_gaps == pytest.approx({"o1": 0.5, "o2": 0.75})
    s.observe(0, {"o2": 0.8})
    assert s.f == {"o1": 3.0, "o2": 0.8}  # the stale value of the objective that ran is replaced
    assert s.plan(1, None).weights == {"o1": 1.0}
    assert s.last_gaps == pytest.approx({"o1": 0.5, "o2": 0.225})


def test_maxright_refreshes_every_max_eval_steps():
    """The no-grad probe of all objectives runs at steps 0, 4, 8, ... and nowhere else."""
    calls = []

    def probe(names):
        calls.append(list(names))
        return {n: 2.0 for n in names}

    s = Maxright(objectives(0.5, 0.5), ScheduleConfig(name="maxright", max_eval_steps=4), 12)
    for step in range(12):
        n = next(iter(s.plan(step, probe).weights))
        s.observe(step, {n: 2.0})
    assert len(calls) == 3 and all(c == ["o1", "o2"] for c in calls)
    probed_at = []
    s2 = Maxright(objectives(0.5, 0.5), ScheduleConfig(name="maxright", max_eval_steps=4), 12)
    for step in range(12):
        if s2.plan(step, probe).probed:
            probed_at.append(step)
    assert probed_at == [0, 4, 8]


def test_maxright_online_optimum_settles():
    """f* unknown: feed the losses of an objective that decays to a plateau of 1.0 with scatter
    0.05 (f_t = 1 + 2 exp(-t/50) + noise). The estimate (lowest smoothed loss) ends within 0.05 of
    the plateau, below the first loss, and no longer moves over the last 300 observations."""
    rng = random.Random(0)
    s = Maxright(objectives(1.0), ScheduleConfig(name="maxright"), 1000)
    history = []
    for t in range(1000):
        s.observe(t, {"o1": 1 + 2 * math.exp(-t / 50) + rng.gauss(0, 0.05)})
        history.append(s.optimum("o1"))
    assert abs(history[-1] - 1.0) < 0.05
    assert history[0] > 2.5 and all(a >= b for a, b in zip(history, history[1:]))  # only ever decreases
    assert history[700] - history[-1] < 0.01


def test_maxright_online_gap_is_forgetting():
    """f* unknown. Both objectives improving: gaps are 0 and steps follow the lambda shares
    (o1 gets 3 of every 4). When a probe finds o2 pushed back above its best by more than its
    scatter, o2 has the only positive gap and runs."""
    s = Maxright(objectives(0.75, 0.25), ScheduleConfig(name="maxright", max_eval_steps=8), 100)
    loss = {"o1": 3.0, "o2": 2.0}
    ran = []
    for step in range(8):
        n = next(iter(s.plan(step, lambda names: dict(loss)).weights))
        ran.append(n)
        s.observe(step, {n: loss[n]})
        loss[n] -= 0.05  # training an objective lowers its loss
    assert set(s.last_gaps.values()) == {0.0}
    assert ran.count("o1") == 6 and ran.count("o2") == 2
    forgot = {"o1": loss["o1"], "o2": loss["o2"] + 0.5}
    plan = s.plan(8, lambda names: forgot)
    assert plan.weights == {"o2": 1.0} and s.last_gaps["o2"] > 0 == s.last_gaps["o1"]


def test_maxright_improving_objective_is_not_starved():
    """A fast-improving objective next to a flat noisy one gets its lambda share of the steps.
    (Measuring the gap as fresh value minus a lagging best would make it negative and starve it.)"""
    rng = random.Random(1)
    s = Maxright(objectives(0.5, 0.5), ScheduleConfig(name="maxright", max_eval_steps=10), 200)
    trained = {"o1": 0}

    def loss(n):
        return 1 + 3 * math.exp(-trained["o1"] / 30) + rng.gauss(0, 0.02) if n == "o1" else 0.5 + rng.gauss(0, 0.01)

    ran = []
    for step in range(200):
        n = next(iter(s.plan(step, lambda names: {m: loss(m) for m in names}).weights))
        ran.append(n)
        s.observe(step, {n: loss(n)})
        trained["o1"] += n == "o1"
    assert 80 <= ran.count("o1") <= 120


def test_maxright_zero_lambda_never_runs():
    s = Maxright(objectives(1.0, 0.0, optima=[0.0, 5.0]), ScheduleConfig(name="maxright"), 10)
    assert set(picks(s, 10, probe=lambda names: {"o1": 0.1, "o2": 1.0})) == {"o1"}


# ------------------------------------------------------------------------------ sequential / mix

@pytest.mark.parametrize("weights, steps, expected", [
    ((0.25, 0.75), 8, ["o1"] * 2 + ["o2"] * 6),
    ((0.5, 0.5), 7, ["o1"] * 4 + ["o2"] * 3),  # round(3.5) = 4 (banker's rounding: 4 is even)
    ((0.2, 0.3, 0.5), 10, ["o1"] * 2 + ["o2"] * 3 + ["o3"] * 5),
    ((0.0, 1.0), 4, ["o2"] * 4),
])
def test_sequential_stages_follow_lambda(weights, steps, expected):
    s = Sequential(objectives(*weights), ScheduleConfig(name="sequential"), steps)
    assert picks(s, steps) == expected


def test_mix_weights_are_the_lambdas():
    s = make_schedule(objectives(0.3, 0.7), ScheduleConfig(name="mix"), 5)
    assert s.plan(0, None).weights == {"o1": 0.3, "o2": 0.7}


# ------------------------------------------------------------------------------ in the loop

def test_alright_with_lambda_one_zero_is_the_single_objective_run(tmp_path):
    """ALRIGHT with lambda = (1, 0) over SFT + DPO draws SFT every step: the same losses and final
    weights as training SFT alone (the DPO objective is built but never runs)."""
    single = train(config(tmp_path / "single", "train.max_steps=3", kinds=("sft",)))
    alright = train(config(tmp_path / "alright", "train.max_steps=3", "schedule.name=alright",
                           "objectives.0.weight=1", "objectives.1.weight=0", kinds=("sft", "dpo")))
    assert [r["ran"] for r in alright.train_losses] == [["sft"]] * 3
    assert [r["sft"] for r in alright.train_losses] == [r["sft"] for r in single.train_losses]
    from safetensors.torch import load_file

    a, b = load_file(single.final_dir / "model.safetensors"), load_file(alright.final_dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_mix_gradient_is_the_lambda_weighted_sum(tmp_path):
    """One mix step (lambda = 0.3 SFT, 0.7 DPO; clipping off): the gradient the optimizer receives
    equals 0.3 grad f_SFT + 0.7 grad f_DPO computed by hand on the same batches, each f the
    objective's mean over its step's units (tokens for SFT, pairs for DPO)."""
    cfg = config(tmp_path / "mix", "train.max_steps=1", "optim.max_grad_norm=0", "train.micro_batch_size=4",
                 "objectives.0.weight=0.3", "objectives.1.weight=0.7", kinds=("sft", "dpo"))
    trainer = build_trainer(cfg)
    drawn: dict[str, list] = {n: [] for n in trainer.runs}
    for n, run in trainer.runs.items():
        def record(stream=run.stream, nxt=run.stream.next, name=n):
            batch = nxt()
            drawn[name].append(batch)
            return batch
        run.stream.next = record
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    captured = {}
    real_step = trainer.optimizer.step

    def step_and_check(*args, **kwargs):
        captured["mix"] = [p.grad.clone() for p in params]
        for n, batches in drawn.items():
            trainer.optimizer.zero_grad(set_to_none=True)
            task = trainer.runs[n].objective
            units = sum(task.units(b) for b in batches)
            loss = sum(task.loss(trainer.model, b).losses.sum() for b in batches) / units
            loss.backward()
            captured[n] = [p.grad.clone() for p in params]
        return None  # the check needs the gradients only

    trainer.optimizer.step = step_and_check
    trainer.train_step(0)
    assert len(drawn["sft"]) == 2 and len(drawn["dpo"]) == 2  # accumulation 8 / 4
    for g_mix, g_sft, g_dpo in zip(captured["mix"], captured["sft"], captured["dpo"]):
        torch.testing.assert_close(g_mix, 0.3 * g_sft + 0.7 * g_dpo, rtol=1e-4, atol=1e-7)
    trainer.optimizer.step = real_step


@pytest.mark.parametrize("schedule", ["alright", "maxright"])
def test_schedule_state_survives_resume(tmp_path, schedule):
    """Run 6 steps saving at 3, then resume from step 3: steps 4-6 choose the same objectives and
    give bit-identical losses (the draw generator / the stale values, bests and run counts are
    checkpointed; maxright refreshes every 2 steps, so a refresh falls in the resumed half)."""
    cfg = config(tmp_path / "run", "train.max_steps=6", "train.save_steps=3", f"schedule.name={schedule}",
                 "schedule.max_eval_steps=2", "schedule.seed=11", kinds=("sft", "dpo"))
    full = train(cfg)
    assert len({tuple(r["ran"]) for r in full.train_losses}) == 2  # both objectives ran
    shutil.rmtree(tmp_path / "run" / "final")
    cfg.train.resume = True
    resumed = build_trainer(cfg)
    assert resumed.step == 3
    assert resumed.train().train_losses == full.train_losses[3:]

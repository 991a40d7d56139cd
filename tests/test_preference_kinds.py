"""The preference kinds beyond plain DPO: the DPO family's ``loss`` field, ``simpo`` and ``orpo``
(reference-free), wired through the kind seam. Their pure losses are tested by hand in
test_preference_losses.py; here the kinds' wiring is: hand values through each kind's collate and
loss on fixed log-probs (a fake ``Forward``), packed == padded, accumulation equivalence through
the loop, a run of each paired with SFT under ALRIGHT, configs and the seed command line.

The fake ``Forward`` gives every response token ``t`` the log-prob ``-t / scale`` of the "model" it
is asked about (policy scale 10, reference scale 8), so summed log-probs follow from the token ids.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch.testing import assert_close

from bipost.configio import ConfigError, load_config
from bipost.data.types import PrefExample
from bipost.kinds import make_objective
from bipost.run import train

from helpers import EOS, POLICY, REFERENCE, TokenLogps, config, workspace



# One pair: prompt (1, 3), chosen (4, EOS), rejected (6, EOS).
# policy: chosen -(4 + 2)/10 = -0.6, rejected -(6 + 2)/10 = -0.8 (token means -0.3, -0.4)
# reference: chosen -6/8 = -0.75, rejected -8/8 = -1.0
# r_c = 0.15, r_r = 0.2, h = r_c - r_r = -0.05
PAIRS = [PrefExample(0, (1, 3), (4, EOS), (6, EOS))]


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def kind_loss(kind: str, packing: bool, **fields) -> torch.Tensor:
    obj = make_objective(kind, TokenLogps(), packing, REFERENCE if kind == "dpo" else None, **fields)
    batch = obj.collate(0)(PAIRS)
    out = obj.loss(POLICY, batch)
    assert_close(out.units, torch.ones(1))
    assert float(obj.units(batch)) == 1.0  # one unit per pair, known before the forward
    return out.losses


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_dpo_family_losses_through_the_kind_by_hand(packing):
    """h = -0.05, r_c = 0.15, r_r = 0.2 (module docstring).
    hinge, beta 2: max(0, 1 - 2 * (-0.05)) = 1.1.
    apo_zero, beta 2: s(-2 * 0.15) + s(2 * 0.2) = s(-0.3) + s(0.4) = 0.425557 + 0.598688 = 1.024245.
    apo_down, beta 2: s(2 * 0.15) + s(-2 * (-0.05)) = s(0.3) + s(0.1) = 0.574443 + 0.524979 = 1.099422.
    robust, beta 2, eps 0.1: l(x) = -log s(2x); (0.9 l(-0.05) - 0.1 l(0.05)) / 0.8
      = (0.9 * 0.744397 - 0.1 * 0.644397) / 0.8 = 0.756897."""
    nls = lambda x: math.log1p(math.exp(-x))  # noqa: E731  -log s(x)
    want = {
        ("hinge", 0.0): 1.1,
        ("apo_zero", 0.0): sig(-0.3) + sig(0.4),
        ("apo_down", 0.0): sig(0.3) + sig(0.1),
        ("robust", 0.1): (0.9 * nls(-0.1) - 0.1 * nls(0.1)) / 0.8,
    }
    for (loss, eps), value in want.items():
        got = kind_loss("dpo", packing, beta=2.0, loss=loss, label_smoothing=eps)
        assert_close(got, torch.tensor([value]), rtol=0, atol=1e-6)
    assert want[("apo_zero", 0.0)] == pytest.approx(1.024245, abs=1e-6)
    assert want[("robust", 0.1)] == pytest.approx(0.756897, abs=1e-6)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_simpo_and_orpo_through_the_kind_by_hand(packing):
    """Token means m_c = -0.3, m_r = -0.4 (no reference: the fake reference would change nothing).
    SimPO, beta 2, gamma 1: z = 2 * 0.1 - 1 = -0.8, loss -log s(-0.8) = log(1 + e^0.8) = 1.171101.
    ORPO, lambda 0.1: log odds(m) = m - log(1 - e^m): -0.3 + 1.350226 = 1.050226 and
    -0.4 + 1.109633 = 0.709633, lor = 0.340593; loss = 0.3 + 0.1 * log(1 + e^-0.340593)
      = 0.3 + 0.1 * 0.537282 = 0.353728."""
    assert math.log1p(math.exp(0.8)) == pytest.approx(1.171101, abs=1e-6)
    assert_close(kind_loss("simpo", packing, beta=2.0, gamma=1.0), torch.tensor([1.171101]), rtol=0, atol=1e-6)
    lor = (-0.3 - math.log(1 - math.exp(-0.3))) - (-0.4 - math.log(1 - math.exp(-0.4)))
    assert lor == pytest.approx(0.340593, abs=1e-6)
    want = 0.3 + 0.1 * math.log1p(math.exp(-lor))
    assert want == pytest.approx(0.353728, abs=1e-6)
    assert_close(kind_loss("orpo", packing, odds_ratio_weight=0.1), torch.tensor([want]), rtol=0, atol=1e-6)


def test_simpo_and_orpo_build_no_reference_model(tmp_path, caplog):
    """Reference-free kinds never ask for a frozen model: building them with a context whose
    frozen_model fails works, and a run of SimPO + ORPO loads no frozen model."""
    from bipost.kinds import BuildContext, get_kind

    cfg = config(tmp_path / "c", kinds=("simpo", "orpo"))

    def no_model(path):
        raise AssertionError(f"a reference-free kind asked for {path}")

    for ocfg in cfg.objectives:
        ctx = BuildContext(cfg, None, None, None, TokenLogps(), None, no_model, tmp_path)
        assert get_kind(ocfg.kind).build(ocfg, ctx).cfg is ocfg
    with caplog.at_level(logging.INFO, logger="bipost"):
        train(config(tmp_path / "run", "train.max_steps=2", kinds=("simpo", "orpo")))
    assert "loading frozen model" not in caplog.text


@pytest.mark.parametrize("kind", ["simpo", "orpo"])
def test_packed_equals_padded(tmp_path, kind):
    """The same steps padded and packed (each prompt laid out once, shared by both responses)."""
    padded = train(config(tmp_path / "pad", "train.max_steps=2", kinds=(kind,)))
    packed = train(config(tmp_path / "pack", "train.max_steps=2", "train.packing=true", kinds=(kind,)))
    assert_close(torch.tensor([r[kind] for r in packed.train_losses]),
                 torch.tensor([r[kind] for r in padded.train_losses]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind, fields", [("simpo", ()), ("orpo", ()), ("dpo", ("objectives.0.loss=apo_down",))])
def test_micro_batch_times_accumulation_is_one_big_batch(tmp_path, kind, fields):
    """Micro-batch 2 x accumulation 4 == 8 x 1: per-pair losses summed, divided by the step's pairs."""
    big = train(config(tmp_path / "big", "train.max_steps=3", *fields, kinds=(kind,)))
    small = train(config(tmp_path / "small", "train.max_steps=3", "train.micro_batch_size=2", *fields, kinds=(kind,)))
    assert_close(torch.tensor([r[kind] for r in small.train_losses]),
                 torch.tensor([r[kind] for r in big.train_losses]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind, fields", [("simpo", ("objectives.1.gamma=0.5",)),
                                          ("orpo", ("objectives.1.odds_ratio_weight=0.2",)),
                                          ("dpo", ("objectives.1.loss=hinge", "objectives.1.beta=0.5"))])
def test_kind_paired_with_sft_under_alright(tmp_path, kind, fields):
    """Each kind alongside SFT on its own data, ALRIGHT drawing one objective per step."""
    result = train(config(tmp_path / "run", "schedule.name=alright", "train.max_steps=6",
                          "objectives.1.data.eval_fraction=0.125", *fields, kinds=("sft", kind)))
    ran = [r["ran"][0] for r in result.train_losses]
    assert set(ran) == {"sft", kind}
    assert all(math.isfinite(r[r["ran"][0]]) for r in result.train_losses)
    assert math.isfinite(result.eval_history[-1][kind])


# ------------------------------------------------------------------------------- configs
def test_dpo_loss_field_and_its_loss_type_alias(tmp_path):
    """``loss`` is the field; ``loss_type`` (its earlier name, in saved config.yaml files) still
    loads; both at once is an error, as is an unknown loss; another kind accepts ``loss_type`` only
    at DPO's default (saved configs listed every kind's fields)."""
    base = [f"model.path={workspace() / 'model'}", f"objectives.0.data.path={workspace() / 'pref.jsonl'}"]
    cfg = load_config(overrides=base + ["objectives.0.kind=dpo", "objectives.0.loss_type=robust",
                                        "objectives.0.label_smoothing=0.1"])
    assert cfg.objectives[0].loss == "robust" and not hasattr(cfg.objectives[0], "loss_type")
    with pytest.raises(ConfigError, match="objectives.0.loss_type is another name of objectives.0.loss"):
        load_config(overrides=base + ["objectives.0.kind=dpo", "objectives.0.loss_type=ipo", "objectives.0.loss=ipo"])
    with pytest.raises(ConfigError, match="objectives.0.loss must be one of sigmoid, ipo, hinge"):
        load_config(overrides=base + ["objectives.0.kind=dpo", "objectives.0.loss=nope"])
    simpo = load_config(overrides=base + ["objectives.0.kind=simpo", "objectives.0.loss_type=sigmoid"])
    assert type(simpo.objectives[0]).__name__ == "SimPOConfig"
    with pytest.raises(ConfigError, match="objectives.0.loss_type is a field of dpo objectives, not of simpo"):
        load_config(overrides=base + ["objectives.0.kind=simpo", "objectives.0.loss_type=hinge"])
    from bipost.configio import describe

    assert any("objectives.N.loss (str" in line and "also accepted as loss_type" in line for line in describe())


def test_checkpoint_settings_saved_under_an_alias_are_the_same_settings():
    """A checkpoint written when the field was ``loss_type`` resumes under ``loss`` (no settings diff)."""
    from bipost.train.resume import settings_diff

    cfg = {"objectives": [{"kind": "dpo", "beta": 0.1, "loss": "ipo"}], "optim": {"lr": 1e-5}}
    old = {"objectives": [{"kind": "dpo", "beta": 0.1, "loss_type": "ipo"}], "optim": {"lr": 1e-5}}
    assert settings_diff({"config": old, "world_size": 1}, {"config": cfg, "world_size": 1}) == []
    changed = {"objectives": [{"kind": "dpo", "beta": 0.1, "loss_type": "hinge"}], "optim": {"lr": 1e-5}}
    assert settings_diff({"config": changed, "world_size": 1}, {"config": cfg, "world_size": 1}) == \
        ["objectives.0.loss: 'hinge' -> 'ipo'"]


@pytest.mark.parametrize("override, message", [
    ("objectives.0.beta=0", "objectives.0.beta must be > 0"),
    ("objectives.0.label_smoothing=0.5", "objectives.0.label_smoothing must be in [0, 0.5)"),
    ("objectives.0.gamma=.inf", "objectives.0.gamma must be a finite number"),
])
def test_simpo_config_checks(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        load_config(overrides=[f"model.path={workspace() / 'model'}", "objectives.0.kind=simpo",
                               f"objectives.0.data.path={workspace() / 'pref.jsonl'}", override])


def test_orpo_config_check():
    with pytest.raises(ConfigError, match="objectives.0.odds_ratio_weight: lambda must be >= 0"):
        load_config(overrides=[f"model.path={workspace() / 'model'}", "objectives.0.kind=orpo",
                               f"objectives.0.data.path={workspace() / 'pref.jsonl'}",
                               "objectives.0.odds_ratio_weight=-1"])


# ------------------------------------------------------------------------------- the seed command line
def seed(*extra: str):
    from bipost.cli.train_bi_objective import config_from_argv

    ws = workspace()
    return config_from_argv(["--pretrain", str(ws / "model"), "--dataset_1", str(ws / "sft.jsonl"),
                             "--dataset_2", str(ws / "pref.jsonl"), *extra])


def test_seed_command_line_takes_the_new_kinds_and_losses():
    """--obj_N SIMPO / ORPO / KTO read the preference flags; their own flags, and --dpo_loss."""
    s = seed("--obj_2", "simpo", "--simpo_beta", "2.5", "--simpo_gamma", "1.4", "--pref_chosen_key", "chosen")
    o = s.objectives[1]
    assert (o.kind, o.beta, o.gamma, o.label_smoothing) == ("simpo", 2.5, 1.4, 0.0)
    assert (o.data.format, o.data.chosen_key) == ("preference", "chosen")
    o = seed("--obj_2", "ORPO", "--orpo_lambda", "0.25").objectives[1]
    assert (o.kind, o.odds_ratio_weight, o.data.format) == ("orpo", 0.25, "preference")
    o = seed("--obj_2", "KTO", "--kto_beta", "0.2", "--kto_undesirable_weight", "1.5",
             "--ref_model", str(workspace() / "teacher")).objectives[1]
    assert (o.kind, o.beta, o.desirable_weight, o.undesirable_weight) == ("kto", 0.2, 1.0, 1.5)
    assert o.reference == str(workspace() / "teacher") and o.data.format == "auto"  # pairs or unpaired rows
    o = seed("--obj_2", "DPO", "--dpo_loss", "apo_zero").objectives[1]
    assert o.loss == "apo_zero"
    o = seed("--obj_2", "DPO", "--dpo_loss", "robust", "--dpo_label_smoothing", "0.2").objectives[1]
    assert (o.loss, o.label_smoothing) == ("robust", 0.2)


@pytest.mark.parametrize("extra, message", [
    (["--obj_2", "DPO", "--dpo_ipo", "--dpo_loss", "hinge"], "--dpo_ipo and --dpo_loss hinge contradict"),
    (["--obj_2", "DPO", "--dpo_loss", "hinge", "--dpo_label_smoothing", "0.1"],
     "--dpo_loss hinge and --dpo_label_smoothing contradict"),
    (["--obj_2", "SIMPO", "--ref_model", "x"], r"neither objective is (\w+, )*DPO\b.* or \w+$"),
    (["--obj_2", "SIMPO", "--simpo_beta_2", "1"], "--simpo_beta_2 applies only when both objectives are SIMPO"),
])
def test_seed_command_line_errors(extra, message):
    with pytest.raises(ConfigError, match=message):
        seed(*extra)

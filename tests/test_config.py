"""Typed config: YAML + overrides, validation messages, documentation of every field."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from bipost import config as C
from bipost.configio import ConfigError, describe, field_docs, load_config


def _all_dataclasses(cls, seen=None):
    seen = seen if seen is not None else set()
    if cls in seen:
        return seen
    seen.add(cls)
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls, vars(C))[f.name]
        for t in (tp, *typing.get_args(tp)):
            if dataclasses.is_dataclass(t):
                _all_dataclasses(t, seen)
    return seen


def test_every_field_has_a_docstring():
    for cls in _all_dataclasses(C.RunConfig):
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_help_lists_every_leaf_field():
    text = "\n".join(describe())
    for key in ("model.lora.rank", "objectives.N.data.input_key", "schedule.max_eval_steps", "optim.lr",
                "train.resume", "dist.zero_stage"):
        assert key in text


def test_yaml_and_overrides(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("""
model: {path: some/model, lora: {rank: 8, target_modules: [q_proj, v_proj]}}
objectives:
  - {kind: sft, weight: 3, data: {path: a.jsonl}}
  - {kind: dpo, weight: 1, data: {path: b.jsonl}, beta: 0.2}
schedule: {name: alright}
""")
    cfg = load_config(y, ["objectives.1.beta=0.5", "optim.lr=2e-5", "train.report_to=tensorboard",
                          "model.lora.target_modules=all-linear", "objectives.0.data.max_samples=100"])
    assert cfg.model.lora.rank == 8 and cfg.model.lora.target_modules == ["all-linear"]
    assert [o.name for o in cfg.objectives] == ["sft", "dpo"]
    assert [o.weight for o in cfg.objectives] == [0.75, 0.25]  # normalized to sum 1
    assert cfg.objectives[1].beta == 0.5 and cfg.optim.lr == 2e-5
    assert cfg.objectives[0].data.max_samples == 100 and cfg.train.report_to == ["tensorboard"]
    assert cfg.objectives[0].batch_size == cfg.train.batch_size


@pytest.mark.parametrize("overrides, message", [
    (["model.path=m", "objectives.0.kind=sft", "objectives.0.data.path=a", "optim.lrr=1"], "unknown field"),
    (["model.path=m", "objectives.0.kind=ppo", "objectives.0.data.path=a"], r"objectives.0.kind must be one of (\w+, )*dpo, (\w+, )*sft\b"),
    (["model.path=m", "objectives.0.kind=kd", "objectives.0.data.path=a"], "teacher is required"),
    (["model.path=m", "objectives.0.kind=sft"], "objectives.0.data.path is required"),
    (["objectives.0.kind=sft", "objectives.0.data.path=a"], "model.path is required"),
    (["model.path=m", "objectives.0.kind=sft", "objectives.0.data.path=a", "train.batch_size=6",
      "train.micro_batch_size=4"], "multiple of micro_batch_size"),
    (["model.path=m", "objectives.0.kind=sft", "objectives.0.data.path=a", "objectives.1.kind=dpo",
      "objectives.1.data.path=b"], "schedule 'single' trains one objective"),
    (["model.path=m", "objectives.0.kind=sft", "objectives.0.data.path=a", "optim.lr=abc"], "expected float"),
    (["model.path=m", "objectives.0.kind=dpo", "objectives.0.data.path=a", "objectives.0.beta=0"], "beta must be > 0"),
    (["model.path=m", "objectives.0.kind=sft", "objectives.0.data.path=a", "schedule.name=magic"], "schedule.name"),
    (["model.path"], "key.sub=value"),
])
def test_bad_configs_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_missing_and_broken_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_reports_config_errors_with_exit_code_2(capsys):
    from bipost.cli.main import main

    assert main(["train", "model.path=m", "objectives.0.kind=sft"]) == 2
    assert "objectives.0.data.path is required" in capsys.readouterr().err


def test_shipped_configs_validate():
    """Every example config in configs/ (not the accelerate ones) is a valid RunConfig."""
    from pathlib import Path

    root = Path(__file__).parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files
    for f in files:
        load_config(f)

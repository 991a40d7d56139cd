"""Evaluate a saved run or model (``bipost eval``): what to load, from where, with which config.

A target is one of

* a run directory (it holds ``config.yaml``): its ``final/`` model;
* a run's ``final/`` (or ``final-merged/``) folder, or one of its checkpoints
  (``checkpoints/step-N/`` or its ``model/``): that model, with the run's config;
* any other model directory or hub name, with a config given on the command line (or none, for
  benchmarks only).

A LoRA model (a folder with ``adapter_config.json``) is loaded onto its base model: the run's
``model.path``, else the adapter's ``base_model_name_or_path``. The evaluation runs in one process,
on the GPU when there is one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bipost.config import ConfigError, RunConfig


@dataclass
class SavedModel:
    """Where a target's model and run are."""

    model: str
    """The folder (or hub name) holding the weights or the adapter."""
    run_dir: Path | None
    """The run it belongs to (its ``config.yaml``), if any."""
    label: str
    """``final``, ``step-00000100``, or the model folder's name: names the default output folder."""
    step: int | None = None
    """The checkpoint's step, when the target is a checkpoint."""


def _checkpoint_step(folder: Path) -> int | None:
    name = folder.name
    return int(name[len("step-"):]) if name.startswith("step-") and name[len("step-"):].isdigit() else None


def resolve(target: str) -> SavedModel:
    """What ``target`` names (see the module docstring)."""
    p = Path(target)
    if (p / "config.yaml").is_file():
        if not (p / "final").is_dir():
            raise ConfigError(f"run {p} has no final/ model (not finished?): name one of its checkpoints, "
                              f"e.g. {p / 'checkpoints' / 'step-…'}")
        return SavedModel(str(p / "final"), p, "final")
    if p.name.startswith("final") and (p.parent / "config.yaml").is_file():
        return SavedModel(str(p), p.parent, p.name)
    if (p / "COMPLETE").is_file() and (p / "model").is_dir():  # a checkpoint
        return SavedModel(str(p / "model"), p.parent.parent, p.name, _checkpoint_step(p))
    if p.name == "model" and (p.parent / "COMPLETE").is_file():
        return SavedModel(str(p), p.parent.parent.parent, p.parent.name, _checkpoint_step(p.parent))
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{p} is a file: give a run directory, a checkpoint or a model directory")
    return SavedModel(target, None, p.name or target)


def load_model(saved: SavedModel, cfg: RunConfig, device: torch.device) -> tuple[Any, Any]:
    """The model (full, or a LoRA adapter on its base) in eval mode on ``device``, and its tokenizer."""
    from bipost.models import load_causal_lm, load_tokenizer

    folder = Path(saved.model)
    adapter = folder / "adapter_config.json"
    if adapter.is_file():
        from peft import PeftModel

        base_path = cfg.model.path or json.loads(adapter.read_text()).get("base_model_name_or_path")
        if not base_path:
            raise ConfigError(f"{folder} is a LoRA adapter without a base model: pass model.path=<base model>")
        model = PeftModel.from_pretrained(load_causal_lm(base_path, cfg.model, frozen=True), str(folder))
    else:
        base_path = str(folder)
        model = load_causal_lm(base_path, cfg.model, frozen=True)
    # final/ holds the tokenizer; checkpoints keep weights only, the run's tokenizer is the base's.
    tok_path = str(folder) if (folder / "tokenizer_config.json").is_file() else \
        (cfg.model.tokenizer or cfg.model.path or base_path)
    tokenizer = load_tokenizer(tok_path, cfg.model.trust_remote_code)
    return model.to(device).eval(), tokenizer


def load_run_config(saved: SavedModel, config: str | None, overrides: list[str]) -> RunConfig:
    """The run's config (or ``config``) with ``overrides``; checked fully when it names objectives,
    else only its ``eval`` section (benchmarks of a bare model need no objectives)."""
    from bipost import configio

    path = saved.run_dir / "config.yaml" if saved.run_dir is not None else config
    if saved.run_dir is not None and config:
        raise ConfigError(f"{saved.model} belongs to run {saved.run_dir}, whose config.yaml is used; "
                          f"change it with key=value overrides instead of a config file")
    tree = configio.load_tree(path, overrides)
    if saved.run_dir is None:
        tree.setdefault("model", {}).setdefault("path", saved.model)
    cfg = configio.from_dict(RunConfig, tree)
    if cfg.objectives:
        configio.validate(cfg)
    else:
        configio.validate_eval(cfg)
    return cfg


def evaluate_saved(target: str, overrides: list[str] = (), config: str | None = None,
                   out: str | Path | None = None) -> tuple[dict[str, float], Path]:
    """Evaluate ``target`` as its (or the given) config's ``eval`` section says; returns the scores
    and the folder the evaluation's files were written to."""
    from bipost.engine import LocalComm
    from bipost.evaluation.evaluator import Evaluator

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("bipost eval runs in one process (it uses the GPU of that process); launch it without "
                          "torchrun / accelerate launch")
    saved = resolve(target)
    cfg = load_run_config(saved, config, list(overrides))
    e = cfg.eval
    if not e.enabled:
        raise ConfigError("nothing to evaluate: set eval.generate=true and/or eval.benchmarks "
                          "(e.g. eval.benchmarks.0.task=arc_easy)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(saved, cfg, device)
    objectives = {}
    if e.generate:
        from bipost.data import load_objective_data
        from bipost.kinds import get_kind

        for o in cfg.objectives:
            kind = get_kind(o.kind)
            data = load_objective_data(o.data, kind.examples_for(o), tokenizer, objective=o.name or kind.kind)
            objectives[o.name] = (data.eval, data.examples)
    # Not <run>/eval/step-N: that is the folder of the run's own evaluation at that step.
    folder = Path(out) if out else (saved.run_dir / "eval" / "saved" / saved.label if saved.run_dir is not None
                                    else Path(f"eval-{saved.label}"))
    scores = Evaluator(e, tokenizer, LocalComm(device), objectives).run(model, folder, step=saved.step)
    return scores, folder

"""Build a run's parts from its config: tokenizer, policy, the objectives with their frozen models
and data streams, the optimizer and its LR schedule. Nothing here trains; ``loop.py`` does."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from bipost.config import OptimConfig, RunConfig
from bipost.data import ExampleStream, load_objective_data
from bipost.data.load import ObjectiveData
from bipost.engine import Engine
from bipost.kinds import BuildContext, Objective, get_kind
from bipost.modeling.attention import use_packed_attention
from bipost.modeling.forward import Forward, ForwardOptions
from bipost.models import compile_layers, load_causal_lm, load_policy, load_tokenizer

log = logging.getLogger("bipost")


@dataclass
class ObjectiveRun:
    """One objective of a run: the objective, its data and its stream of micro-batches."""

    objective: Objective
    data: ObjectiveData
    stream: ExampleStream
    accum: int
    """Micro-batches per optimizer step on each rank."""

    @property
    def cfg(self):
        return self.objective.cfg

    @property
    def train(self):
        return self.data.train

    @property
    def eval(self):
        return self.data.eval


def build_objectives(cfg: RunConfig, tokenizer, policy, engine: Engine) -> dict[str, ObjectiveRun]:
    frozen: dict[str, torch.nn.Module] = {}  # one copy per path, shared by objectives

    def frozen_model(path: str):
        if path not in frozen:
            log.info("loading frozen model %s", path)
            model = engine.place(load_causal_lm(path, cfg.model, frozen=True))
            if cfg.train.packing:  # references and teachers see the same packed rows as the policy
                use_packed_attention(model)
            frozen[path] = model
        return frozen[path]

    forward = Forward(ForwardOptions(cfg.train.logits, cfg.train.logits_chunk_size, compile=cfg.model.compile), engine)
    if cfg.train.packing:
        use_packed_attention(policy)
    if cfg.model.compile:
        compile_layers(policy)
    cache_dir = Path(cfg.train.cache_dir or Path(cfg.train.output_dir) / "cache")

    runs: dict[str, ObjectiveRun] = {}
    for i, ocfg in enumerate(cfg.objectives):
        kind = get_kind(ocfg.kind)
        data = load_objective_data(ocfg.data, kind.examples_for(ocfg), tokenizer, objective=ocfg.name or kind.kind)
        objective = kind.build(ocfg, BuildContext(cfg, tokenizer, policy, engine, forward, data, frozen_model,
                                                  cache_dir))
        per_rank = ocfg.batch_size // engine.world_size  # type: ignore[operator]
        if per_rank * engine.world_size != ocfg.batch_size or per_rank % ocfg.micro_batch_size:  # type: ignore[operator]
            raise ValueError(
                f"objective {ocfg.name}: batch_size {ocfg.batch_size} must be divisible by "
                f"world_size {engine.world_size} x micro_batch_size {ocfg.micro_batch_size}"
            )
        stream = ExampleStream(
            # per-row weights (data.weight_key / weights_file) ride on the training batches only
            data.train, ocfg.micro_batch_size,  # type: ignore[arg-type]
            data.weigh(objective.collate(tokenizer.pad_token_id)),  # type: ignore[arg-type]
            seed=cfg.train.seed + 1000 * i, rank=engine.rank, world_size=engine.world_size,
            prefetch=cfg.train.prefetch,
        )
        runs[objective.name] = ObjectiveRun(objective, data, stream, per_rank // ocfg.micro_batch_size)  # type: ignore[operator]
    return runs


def steps_per_pass(runs: dict[str, ObjectiveRun]) -> dict[str, int]:
    """Optimizer steps one pass over each objective's training data takes."""
    return {n: max(1, math.ceil(len(r.train) / r.cfg.batch_size)) for n, r in runs.items()}  # type: ignore[operator]


def step_budget(cfg: RunConfig, runs: dict[str, ObjectiveRun]) -> int:
    """Shared by every schedule so that comparisons are fair: epochs over the largest objective."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * max(steps_per_pass(runs).values())))


def lr_lambda(cfg: OptimConfig, total_steps: int):
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if cfg.scheduler == "linear":
            decay = 1.0 - progress
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay

    return factor


def build_optimizer(cfg: OptimConfig, model, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    # fused: one kernel for all parameters (CPU and CUDA); the per-tensor default is ~20x slower on CPU.
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                            weight_decay=cfg.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
    return opt, sched


def build_policy_and_tokenizer(cfg: RunConfig):
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, cfg.model.trust_remote_code)
    policy = load_policy(cfg.model)
    return tokenizer, policy

"""Build a run's parts from its config: tokenizer, policy, tasks with their frozen models, data
streams, optimizer and LR schedule. Nothing here trains; ``loop.py`` does."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from bipost.config import ObjectiveConfig, OptimConfig, RunConfig
from bipost.data import ExampleStream, load_objective_data
from bipost.models import is_peft, load_causal_lm, load_policy, load_tokenizer, resolve_dtype
from bipost.train.attention import use_packed_attention
from bipost.train.engine import Engine
from bipost.train.refcache import ReferenceLogps, cache_meta, compute_reference_logps, load_or_build
from bipost.train.tasks import DPOTask, ForwardOptions, KDTask, Task, make_task, positions, unwrap
from bipost.train.teachercache import TeacherTopK, compute_teacher_topk, load_or_build_teacher, teacher_cache_meta

log = logging.getLogger("bipost")


@dataclass
class ObjectiveRun:
    """An objective with its task, data and stream."""

    cfg: ObjectiveConfig
    task: Task
    train: list
    eval: list
    stream: ExampleStream
    accum: int
    """Micro-batches per optimizer step on each rank."""
    summary: object


def build_objectives(cfg: RunConfig, tokenizer, policy, engine: Engine) -> dict[str, ObjectiveRun]:
    frozen: dict[str, torch.nn.Module] = {}  # one copy per path, shared by objectives

    def frozen_model(path: str):
        if path not in frozen:
            log.info("loading frozen model %s", path)
            frozen[path] = engine.place(load_causal_lm(path, cfg.model, frozen=True))
        return frozen[path]

    fwd = ForwardOptions(cfg.train.logits, cfg.train.logits_chunk_size, compile=cfg.model.compile)
    if cfg.train.packing:
        use_packed_attention(policy)
    if cfg.model.compile:
        compile_layers(policy)

    def frozen_for_task(path: str):
        model = frozen_model(path)
        if cfg.train.packing:  # references and teachers see the same packed rows as the policy
            use_packed_attention(model)
        return model

    runs: dict[str, ObjectiveRun] = {}
    for i, ocfg in enumerate(cfg.objectives):
        task = make_task(ocfg, fwd, cfg.train.packing)
        data = load_objective_data(ocfg.data, ocfg.kind, tokenizer)
        if isinstance(task, DPOTask):
            ref_path = ocfg.reference or cfg.model.path
            if ocfg.cache_reference:
                # Computed once from a reference loaded only if the cache must be (re)built: the
                # policy's initial weights (or, with LoRA, its base: the same values).
                task.ref_cache = _reference_cache(cfg, ocfg, task, data, tokenizer, engine,
                                                  lambda: frozen_for_task(ref_path))
            elif ocfg.reference or not is_peft(policy):
                task.reference = frozen_for_task(ref_path)
            # else: LoRA policy with its adapter disabled (no second copy)
        if isinstance(task, KDTask):
            if ocfg.cache_teacher:  # the teacher is loaded only if the cache must be (re)built
                task.teacher_cache = _teacher_cache(cfg, ocfg, task, data, tokenizer, engine, policy,
                                                    lambda: frozen_for_task(ocfg.teacher))
            else:
                task.teacher = frozen_for_task(ocfg.teacher)  # type: ignore[arg-type]
                if ocfg.kd_topk:
                    check_topk_teacher(ocfg, head_rows(policy), task.teacher)
        per_rank = ocfg.batch_size // engine.world_size  # type: ignore[operator]
        if per_rank * engine.world_size != ocfg.batch_size or per_rank % ocfg.micro_batch_size:  # type: ignore[operator]
            raise ValueError(
                f"objective {ocfg.name}: batch_size {ocfg.batch_size} must be divisible by "
                f"world_size {engine.world_size} x micro_batch_size {ocfg.micro_batch_size}"
            )
        stream = ExampleStream(
            data.train, ocfg.micro_batch_size, task.collate(tokenizer.pad_token_id),
            seed=cfg.train.seed + 1000 * i, rank=engine.rank, world_size=engine.world_size,
            prefetch=cfg.train.prefetch,
        )
        runs[ocfg.name] = ObjectiveRun(ocfg, task, data.train, data.eval, stream,
                                       per_rank // ocfg.micro_batch_size, data.summary)  # type: ignore[arg-type]
    return runs


def _reference_cache(cfg: RunConfig, ocfg: ObjectiveConfig, task: DPOTask, data, tokenizer, engine: Engine,
                     reference) -> ReferenceLogps:
    """Load or compute ``ocfg``'s cached reference log-probs (``train/refcache.py``)."""
    examples = list(data.train) + list(data.eval)
    ref_path = ocfg.reference or cfg.model.path
    meta = cache_meta(examples, ref_path, tokenizer, ocfg.data.max_len, str(resolve_dtype(cfg.model.dtype)))
    cache_dir = Path(cfg.train.cache_dir or Path(cfg.train.output_dir) / "cache")

    stage = f"reference cache build ({ocfg.name})"

    def build():
        model = reference()
        collate = task.collate(tokenizer.pad_token_id)  # no ref_cache yet: plain batches
        batch_size = cfg.train.eval_batch_size or ocfg.micro_batch_size
        # [issue 10] ranks hold different numbers of batches: the engine's no-grad forwards keep them in step
        forwards = lambda batches: engine.no_grad_forwards(  # noqa: E731
            model, lambda m, b: task.sequence_logps(m, b)[0], batches, filler=collate(examples[:1]), stage="forwards")
        return compute_reference_logps(examples, forwards, collate, batch_size, engine.rank, engine.world_size,
                                       engine.all_reduce_sum)

    with engine.stage(stage):  # [issue 10] a hang here names the cache build
        return load_or_build(cache_dir / f"ref-{ocfg.name}.pt", examples, meta, build,
                             is_main=engine.is_main, barrier=engine.barrier, any_rank=engine.any_rank)


def _teacher_cache(cfg: RunConfig, ocfg: ObjectiveConfig, task: KDTask, data, tokenizer, engine: Engine,
                   policy, teacher) -> TeacherTopK:
    """Load or compute ``ocfg``'s cached teacher top-k log-probs (``train/teachercache.py``)."""
    examples = list(data.train) + list(data.eval)
    meta = teacher_cache_meta(examples, ocfg.teacher, tokenizer, ocfg.data.max_len,  # type: ignore[arg-type]
                              str(resolve_dtype(cfg.model.dtype)), ocfg.kd_topk, ocfg.temperature)
    cache_dir = Path(cfg.train.cache_dir or Path(cfg.train.output_dir) / "cache")

    student_vocab = head_rows(policy)

    stage = f"teacher cache build ({ocfg.name})"

    def build():
        task.teacher = teacher()
        check_topk_teacher(ocfg, student_vocab, task.teacher)
        try:
            collate = task.collate(tokenizer.pad_token_id)  # no cache yet: plain batches

            def topk(_model, batch):  # the task's teacher runs the forward
                pos = positions(batch, task.num_seqs(batch))
                return (*task.teacher_topk(batch, pos), pos.seq)

            # [issue 10] every rank runs every batch (same counts); the engine's no-grad forwards all the same
            forwards = lambda batches: engine.no_grad_forwards(task.teacher, topk, batches, stage="forwards")  # noqa: E731
            return compute_teacher_topk(examples, forwards, collate, cfg.train.eval_batch_size or ocfg.micro_batch_size)
        finally:
            task.teacher = None  # not resident while training

    with engine.stage(stage):  # [issue 10] a hang here names the cache build
        cache = load_or_build_teacher(cache_dir / f"teacher-{ocfg.name}.pt", examples, meta, build,
                                      is_main=engine.is_main, barrier=engine.barrier, any_rank=engine.any_rank)
    if cache.ids.numel() and int(cache.ids.max()) >= student_vocab:
        raise ValueError(f"objective {ocfg.name}: the teacher cache holds token id {int(cache.ids.max())}, outside the "
                         f"policy's vocabulary of {student_vocab}")
    return cache


def head_rows(model) -> int:
    """Rows of the output head (the vocabulary it scores), through DDP/compile/peft wrappers."""
    weight = unwrap(model).get_output_embeddings().weight
    return int(getattr(weight, "ds_shape", weight.shape)[0])  # ZeRO-3 partitions keep the full shape aside


def check_topk_teacher(ocfg: ObjectiveConfig, student_vocab: int, teacher) -> None:
    """Top-k KD gathers the student's log-probs at the teacher's token ids: the heads must agree."""
    teacher_vocab = head_rows(teacher)
    if teacher_vocab != student_vocab:
        raise ValueError(f"objective {ocfg.name}: teacher {ocfg.teacher} scores {teacher_vocab} tokens, the policy "
                         f"{student_vocab}; distillation needs the same vocabulary (and tokenizer)")
    if ocfg.kd_topk > student_vocab:
        raise ValueError(f"objective {ocfg.name}: kd_topk={ocfg.kd_topk} exceeds the vocabulary size {student_vocab}")


def compile_layers(model) -> None:
    """``torch.compile`` each decoder layer in place. Shapes start static and turn dynamic on the
    first change (torch's automatic dynamic): fixed-length rows keep the leaner static code,
    packed rows of varying length recompile once."""
    inner = model.get_base_model() if is_peft(model) else model
    for layer in inner.get_decoder().layers:
        layer.compile()


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

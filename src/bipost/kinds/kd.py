"""``kd``: knowledge distillation from a frozen teacher that shares the policy's tokenizer, or from
the teacher's top-k log-probs stored with the data (``teacher_logprobs: data``; no teacher loaded)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from bipost.config import ConfigError, ObjectiveConfig
from bipost.data.examples import SFT
from bipost.data.store import Concat
from bipost.data.teacher_topk import TOPK, stored_k
from bipost.example_cache import ExampleCache, cache_meta, compute_rows, load_or_build
from bipost.kinds.base import BuildContext, Objective
from bipost.modeling.forward import Positions, positions
from bipost.models import resolve_dtype
from bipost.objectives.chunked import chunked_kd_loss, chunked_topk_kd_loss, teacher_topk
from bipost.objectives.kd import check_kd_args


@dataclass
class KDConfig(ObjectiveConfig):
    """Distillation on the positions that predict a response token."""

    teacher: Optional[str] = None
    """Teacher model path (must share the policy's tokenizer); with teacher_logprobs=data only ``bipost distill-topk`` uses it."""
    teacher_logprobs: str = "model"
    """Where the teacher's distribution comes from: model (the teacher, live or with cache_teacher) | data (top-k ids and log-probs stored in the data's columns, e.g. written by ``bipost distill-topk`` or axolotl's KD layout; no teacher is loaded; forward KD on the stored top-k; docs/data.md)."""
    stored_temperature: float = 1.0
    """With teacher_logprobs=data: the temperature the stored log-probs were computed at (distill-topk writes 1.0); they are rescaled to ``temperature`` exactly."""
    kd_loss: str = "forward"
    """forward (teacher soft-label cross-entropy) | reverse (reverse KL) | jsd."""
    temperature: float = 1.0
    """Softmax temperature (the loss is scaled by T^2)."""
    jsd_beta: float = 0.5
    """Interpolation weight of the generalized JSD."""
    kd_topk: int = 0
    """Distil from the teacher's k most likely tokens at each position, their probabilities renormalized to sum to 1 (forward KD only; k = vocabulary size is exactly forward KD). 0: the full distribution (with teacher_logprobs=data: the data's k; a k other than the data's is an error)."""
    cache_teacher: bool = False
    """With kd_topk: compute the teacher's top-k log-probs once before training and cache them on disk (8k bytes per response token; keyed by the data, teacher model, tokenizer, max_len, k and temperature; a stale cache is rebuilt). No teacher is kept in memory while training."""

    def check(self, where: str) -> None:
        if self.teacher_logprobs not in ("model", "data"):
            raise ConfigError(f"{where}.teacher_logprobs must be model or data, not {self.teacher_logprobs!r}")
        if self.teacher_logprobs == "data":
            self._check_stored(where)
        elif not self.teacher:
            raise ConfigError(f"{where}.teacher is required for kd (a model sharing the policy's tokenizer)")
        try:
            check_kd_args(kind=self.kd_loss, temperature=self.temperature, jsd_beta=self.jsd_beta)
        except ValueError as e:
            raise ConfigError(f"{where}.{e}") from None
        if self.kd_topk < 0:
            raise ConfigError(f"{where}.kd_topk must be >= 0")
        if self.kd_topk and self.kd_loss != "forward":
            raise ConfigError(f"{where}.kd_topk distils the teacher's top-k tokens with forward KD; "
                              f"kd_loss is {self.kd_loss!r}")
        if self.cache_teacher and not self.kd_topk:
            raise ConfigError(f"{where}.cache_teacher caches the teacher's top-k log-probs: set {where}.kd_topk (e.g. 32)")

    def _check_stored(self, where: str) -> None:
        if self.kd_loss != "forward":
            raise ConfigError(f"{where}.teacher_logprobs=data distils the stored top-k tokens with forward KD; "
                              f"kd_loss is {self.kd_loss!r}")
        if self.cache_teacher:
            raise ConfigError(f"{where}.cache_teacher computes top-k log-probs from the teacher; with "
                              f"teacher_logprobs=data they come from the data")
        if not self.stored_temperature > 0:
            raise ConfigError(f"{where}.stored_temperature must be > 0, got {self.stored_temperature}")


def _content(e) -> tuple:
    return (e.prompt_ids, e.response_ids)


class KD(Objective):
    """Distillation on the positions that predict a response token (the *shifted* labels: the
    original's off-by-one is not copied). With ``kd_topk`` the teacher's top-k tokens come from the
    teacher cache (attached to batches by the collate) or from the teacher, online; with
    ``teacher_logprobs: data`` from the data's columns (``data/teacher_topk.py``), attached by the
    collate the same way. Unit: a response token."""

    kind = "kd"
    config_class = KDConfig
    examples = SFT
    cli_name = "KD"
    seed_model = "teacher"
    seed_model_required = True
    cfg: KDConfig

    def __init__(self, cfg: KDConfig, forward=None, packing: bool = False, *,
                 teacher: torch.nn.Module | None = None, teacher_cache: ExampleCache | None = None):
        super().__init__(cfg, forward, packing)
        self.stored = cfg.teacher_logprobs == "data"
        """The teacher's top-k comes with the examples (``teacher_logprobs: data``)."""
        if teacher is None and teacher_cache is None and not self.stored:
            raise ValueError(f"objective {cfg.name}: kd needs a teacher or a teacher cache")
        self.teacher = teacher
        self.teacher_cache = teacher_cache

    @classmethod
    def examples_for(cls, cfg):
        return TOPK if cfg.teacher_logprobs == "data" else SFT

    @classmethod
    def build(cls, cfg, ctx: BuildContext):
        vocab = ctx.engine.head_rows(ctx.policy)
        if cfg.teacher_logprobs == "data":
            _check_stored_k(cfg, ctx, vocab)
            return cls(cfg, ctx.forward, ctx.packing)
        if cfg.cache_teacher:  # the teacher is loaded only if the cache must be (re)built
            return cls(cfg, ctx.forward, ctx.packing, teacher_cache=_teacher_cache(cfg, ctx, vocab))
        teacher = ctx.frozen_model(cfg.teacher)
        if cfg.kd_topk:
            _check_topk_teacher(cfg, vocab, ctx.engine.head_rows(teacher))
        return cls(cfg, ctx.forward, ctx.packing, teacher=teacher)

    def collate(self, pad_id):
        if self.stored:  # the stored rows are the examples' own fields
            return TOPK.collate_fn(pad_id, self.packing)
        base = super().collate(pad_id)
        return base if self.teacher_cache is None else self.teacher_cache.attach(base, _put_topk)

    def loss(self, model, batch):
        c = self.cfg
        pos = positions(batch, self.num_seqs(batch))
        student, head, chunk = self.forward.head_inputs(model, batch, pos)
        if c.kd_topk or self.stored:
            ids, logps = self._teacher_topk(batch, pos)
            return chunked_topk_kd_loss(student, head, ids, logps, pos.seq, pos.num_seqs,
                                        temperature=c.temperature, chunk_size=chunk)
        with torch.no_grad():
            teacher, teacher_head, _ = self.forward.head_inputs(self.teacher, batch, pos)
        return chunked_kd_loss(student, teacher, head, teacher_head, pos.seq, pos.num_seqs,
                               kind=c.kd_loss, temperature=c.temperature, jsd_beta=c.jsd_beta, chunk_size=chunk)

    def _teacher_topk(self, batch: dict, pos: Positions) -> tuple[torch.Tensor, torch.Tensor]:
        if "teacher_topk_ids" in batch:
            ids, logps = batch["teacher_topk_ids"], batch["teacher_topk_logps"]
            if ids.shape[0] != pos.index.shape[0]:
                raise ValueError(f"teacher top-k rows ({ids.shape[0]}) do not match the batch's response positions "
                                 f"({pos.index.shape[0]}): they were computed for other data or collation")
            ratio = self.cfg.stored_temperature / self.cfg.temperature
            if self.stored and ratio != 1.0:
                # log p_T = (T_stored / T) log p_stored + const; the loss renormalizes over the k ids
                logps = logps * ratio
            return ids, logps
        return topk_of(self.forward, self.teacher, batch, pos, self.cfg)


def topk_of(forward, teacher, batch: dict, pos: Positions, cfg: KDConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k ``(ids, logps)`` ``[M, k]`` at the batch's response positions."""
    with torch.no_grad():
        x, head, chunk = forward.head_inputs(teacher, batch, pos)
        return teacher_topk(x, head, cfg.kd_topk, cfg.temperature, chunk)


def topk_rows(forward, cfg: KDConfig):
    """``fn(teacher, batch) -> ({"ids": int32 [M, k], "logps": fp32 [M, k]}, seq [M])`` for
    ``example_cache.compute_rows``: the teacher's top-k (``cfg.kd_topk``, at ``cfg.temperature``) at
    the batch's response positions, in the chunked path's order (the teacher cache and
    ``bipost distill-topk`` both store these rows)."""

    def topk(teacher, batch):
        pos = positions(batch, int(batch["row_ids"].shape[0]))
        ids, logps = topk_of(forward, teacher, batch, pos, cfg)
        return {"ids": ids.to(torch.int32), "logps": logps.float()}, pos.seq

    return topk


def _check_topk_teacher(cfg: KDConfig, student_vocab: int, teacher_vocab: int) -> None:
    """Top-k KD gathers the student's log-probs at the teacher's token ids: the heads must agree."""
    if teacher_vocab != student_vocab:
        raise ValueError(f"objective {cfg.name}: teacher {cfg.teacher} scores {teacher_vocab} tokens, the policy "
                         f"{student_vocab}; distillation needs the same vocabulary (and tokenizer)")
    if cfg.kd_topk > student_vocab:
        raise ValueError(f"objective {cfg.name}: kd_topk={cfg.kd_topk} exceeds the vocabulary size {student_vocab}")


def _check_stored_k(cfg: KDConfig, ctx: BuildContext, student_vocab: int) -> None:
    """The stored top-k's k (every store of the objective) against ``kd_topk`` and the vocabulary."""
    for split, view in (("training", ctx.data.train), ("eval", ctx.data.eval)):
        k = stored_k(view) if len(view) else None
        if k is None:
            continue
        if cfg.kd_topk and k != cfg.kd_topk:
            raise ValueError(f"objective {cfg.name}: the {split} data stores the teacher's top-{k}, but kd_topk is "
                             f"{cfg.kd_topk} (set kd_topk to {k}, or 0 to take the data's k)")
        if k > student_vocab:
            raise ValueError(f"objective {cfg.name}: the {split} data stores top-{k}, more than the policy's "
                             f"vocabulary of {student_vocab}")


def _teacher_cache(cfg: KDConfig, ctx: BuildContext, student_vocab: int) -> ExampleCache:
    """The teacher's top-k ids and log-probs at every response position of every train and eval
    example (``8 k`` bytes per response token: int32 ids, fp32 log-probs)."""
    examples = Concat(ctx.data.train, ctx.data.eval)  # by position: no Python object per example
    meta = cache_meta(examples, _content, "teacher", cfg.teacher, ctx.tokenizer, cfg.data.max_len,  # type: ignore[arg-type]
                      str(resolve_dtype(ctx.run.model.dtype)), k=cfg.kd_topk, temperature=cfg.temperature)
    collate = SFT.collate_fn(ctx.tokenizer.pad_token_id, ctx.packing)

    def build():
        teacher = ctx.frozen_model(cfg.teacher)  # type: ignore[arg-type]
        _check_topk_teacher(cfg, student_vocab, ctx.engine.head_rows(teacher))
        return compute_rows(examples, teacher, topk_rows(ctx.forward, cfg), collate,
                            ctx.eval_batch_size or cfg.micro_batch_size, ctx.engine)

    def check(tensors):
        if tensors["ids"].shape[1] != cfg.kd_topk:
            return f"holds top-{tensors['ids'].shape[1]}, not top-{cfg.kd_topk}"
        return None

    cache = load_or_build(ctx.cache_dir / f"teacher-{cfg.name}.pt", examples, _content, meta, build, ctx.engine,
                          f"the teacher's top-{cfg.kd_topk} log-probs", check)
    ids = cache.tensors["ids"]
    if ids.numel() and int(ids.max()) >= student_vocab:
        raise ValueError(f"objective {cfg.name}: the teacher cache holds token id {int(ids.max())}, outside the "
                         f"policy's vocabulary of {student_vocab}")
    return cache


def _put_topk(batch: dict, rows: dict) -> None:
    batch["teacher_topk_ids"], batch["teacher_topk_logps"] = rows["ids"].long(), rows["logps"]

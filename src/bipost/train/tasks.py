"""Objectives bound to models: a batch in, the pure loss function's ``ObjectiveOutput`` out.

This is the seam between the model world and the tensor functions in ``bipost.objectives``:
a task runs the forward passes its objective needs (policy, and reference or teacher) and
hands log-probs to the pure loss. Adding an objective = adding a task class here.

The forward path never materialises full-vocabulary fp32 logits (``train.logits``):

1. the model runs with ``logits_to_keep=1`` and a hook takes the decoder's final hidden states;
2. only the positions that predict a response token are kept (``logp_index`` of a packed batch,
   or the shifted ``labels`` of a padded one: ``objectives.chunked.response_targets``);
3. their log-probs come from the lm_head in chunks (``objectives.chunked``; what ``auto`` picks),
   or, with ``train.logits=liger``, from Liger's fused linear cross-entropy on a GPU.

``plain`` (full logits, then the reference functions of ``objectives.logprobs``/``kd``) remains
for models whose head does more than a linear map (logit soft-capping or scaling).

Batches are padded (``data.collate``) or packed (``data.packing``, with ``train.packing``); the
model must then use packed-aware attention (``train.attention.use_packed_attention``).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

from bipost.config import ObjectiveConfig
from bipost.data.collate import collate_pref, collate_sft
from bipost.data.packing import pack_pref, pack_sft
from bipost.models import as_reference, is_peft
from bipost.train.attention import packed_kwargs
from bipost.objectives import ObjectiveOutput, dpo_loss, kd_loss
from bipost.objectives.chunked import (
    auto_chunk_size,
    chunked_kd_loss,
    chunked_token_logprobs,
    chunked_topk_kd_loss,
    module_token_logprobs,
    response_targets,
    segment_count,
    segment_sum,
    sequence_sft_loss,
    teacher_topk,
)

LOGITS_MODES = ("auto", "chunked", "liger", "plain")


@dataclass
class ForwardOptions:
    """How a task turns hidden states into log-probs (from ``train.logits*``)."""

    logits: str = "auto"
    """auto | chunked | liger | plain (see ``TrainConfig.logits``)."""
    chunk_size: int = 0
    """Positions per lm_head chunk; 0: automatic (256 MiB of fp32 logits per chunk)."""
    compile: bool = False
    """Fuse each lm_head chunk's elementwise work with torch.compile (``model.compile``)."""

    def __post_init__(self) -> None:
        if self.logits not in LOGITS_MODES:
            raise ValueError(f"train.logits must be one of {', '.join(LOGITS_MODES)}, not {self.logits!r}")
        if self.chunk_size < 0:
            raise ValueError(f"train.logits_chunk_size must be >= 0, got {self.chunk_size}")


# ---------------------------------------------------------------- model plumbing
def unwrap(model):
    """The transformers model inside DDP/DeepSpeed (``.module``), torch.compile (``._orig_mod``)
    and peft wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            break
    return model.get_base_model() if is_peft(model) else model


_SCALED_HEAD_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                      "lm_head_multiplier")


def _head_is_linear_map(base) -> bool:
    """False when the model post-processes its lm_head output (soft-capping, scaling): those
    heads only run correctly through the model's own forward (``plain``)."""
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    return all(getattr(cfg, a, None) in (None, 1, 1.0) for a in _SCALED_HEAD_ATTRS)


def _head_is_partitioned(base) -> bool:
    """DeepSpeed ZeRO-3 keeps the lm_head weight partitioned outside the head's own forward
    (``ds_id`` marks such a parameter), so only ``plain`` can use it."""
    head = base.get_output_embeddings()
    return head is not None and hasattr(head.weight, "ds_id")


def _liger_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except ImportError:
        return False
    return True


def model_inputs(batch: dict) -> dict:
    """What the model is called with: a packed row carries position ids and its layout and no
    2D mask; a padded batch its attention mask."""
    if "packed_layout" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                **packed_kwargs(batch["packed_layout"], batch["input_ids"].device)}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def forward_logits(model, batch: dict) -> torch.Tensor:
    """Full ``[B, T, V]`` logits (the ``plain`` path)."""
    return model(**model_inputs(batch), use_cache=False).logits


def forward_hidden(model, batch: dict) -> torch.Tensor:
    """Final hidden states ``[B, T, H]`` (the lm_head's input), through the model's own forward.

    The call goes through the outermost wrapper (so DDP's gradient hooks and peft adapters stay
    in effect) with ``logits_to_keep=1``; a forward hook on the decoder keeps its output.
    """
    decoder = unwrap(model).get_decoder()
    box: list[torch.Tensor] = []

    def keep(_module, _args, output):
        box.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = decoder.register_forward_hook(keep)
    try:
        model(**model_inputs(batch), use_cache=False, **_keep_one_logit(type(unwrap(model))))
    finally:
        handle.remove()
    return box[0]


@functools.lru_cache(maxsize=None)
def _keep_one_logit(cls) -> dict:
    """``logits_to_keep=1`` where the model's forward takes it (transformers >= 4.50 causal LMs),
    so the unused logits cost one position; otherwise nothing (the full logits are computed and
    dropped)."""
    params = inspect.signature(cls.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    return {}


@dataclass
class Positions:
    """The positions of a batch that predict a response token (see ``data.packing``)."""

    index: torch.Tensor
    """``[M]`` flat positions into ``hidden.view(B * T, H)``."""
    target: torch.Tensor
    """``[M]`` the tokens they predict."""
    seq: torch.Tensor
    """``[M]`` sequence of each position, in ``[0, num_seqs)``."""
    num_seqs: int


def positions(batch: dict, num_seqs: int) -> Positions:
    if "logp_index" in batch:
        return Positions(batch["logp_index"], batch["logp_target"], batch["logp_seq"], num_seqs)
    index, target, seq = response_targets(batch["labels"])
    return Positions(index, target, seq, num_seqs)


def _head(model):
    head = unwrap(model).get_output_embeddings()
    weight = head.weight
    if type(weight).__name__ == "DTensor":  # FSDP2: use the full (gathered) head
        weight = weight.full_tensor()
    return head, weight


def _head_fn(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """The output head as a function of hidden states. A plain Linear head is applied through its
    (gathered) weight, never as a module: under FSDP2 a module call inside a checkpointed chunk
    would re-enter FSDP's hooks during the backward's recompute."""
    head, weight = _head(model)
    if isinstance(head, torch.nn.Linear):
        bias = head.bias
        return lambda h: torch.nn.functional.linear(h, weight, bias)
    return head


def resolve_mode(model, opts: ForwardOptions, device: torch.device) -> str:
    base = unwrap(model)
    if opts.logits == "plain" or not _head_is_linear_map(base) or _head_is_partitioned(base):
        return "plain"
    if opts.logits == "auto":
        # Measured on an H100 (bench/RESULTS.md): the own chunked path beats Liger's fused loss with
        # reduction="none" at a large vocabulary (Qwen2-0.5B shape: SFT 31.4k vs 26.4k tok/s, DPO
        # 48.4k vs 43.0k), so Liger runs only when asked for.
        return "chunked"
    if opts.logits == "liger" and not _liger_available(device):
        raise ValueError("train.logits=liger needs liger-kernel on a CUDA device (pip install 'bipost[liger]')")
    return opts.logits


def response_logprobs(model, batch: dict, pos: Positions, opts: ForwardOptions) -> torch.Tensor:
    """Log-prob ``[M]`` (fp32) of every response token of the batch under ``model``."""
    mode = resolve_mode(model, opts, batch["input_ids"].device)
    if mode == "plain":
        logits = forward_logits(model, batch)
        flat = logits.reshape(-1, logits.shape[-1])[pos.index].float()
        return flat.gather(1, pos.target[:, None]).squeeze(1) - torch.logsumexp(flat, dim=-1)
    hidden = forward_hidden(model, batch)
    h = hidden.reshape(-1, hidden.shape[-1])[pos.index]
    head, weight = _head(model)
    bias = getattr(head, "bias", None)
    chunk = opts.chunk_size or auto_chunk_size(weight.shape[0])
    if not isinstance(head, torch.nn.Linear):  # e.g. a LoRA-adapted lm_head
        return module_token_logprobs(h, head, pos.target, chunk)
    if mode == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        nll = liger_fused_linear_cross_entropy(h, weight, pos.target, bias, reduction="none")
        return -nll.float()
    return chunked_token_logprobs(h, weight, pos.target, bias, chunk, compiled=opts.compile)


# ---------------------------------------------------------------- tasks
@dataclass
class Task:
    """One objective of a run: its config, forward options and the frozen models it needs."""

    cfg: ObjectiveConfig
    fwd: ForwardOptions = field(default_factory=ForwardOptions)
    packing: bool = False
    """Collate micro-batches into packed rows (``data.packing``) instead of padded ones."""

    @property
    def name(self) -> str:
        return self.cfg.name  # type: ignore[return-value]

    @property
    def kind(self) -> str:
        return self.cfg.kind

    def collate(self, pad_id: int) -> Callable[[list], dict]:
        if self.packing:
            return pack_sft
        return lambda examples: collate_sft(examples, pad_id)

    def num_seqs(self, batch: dict) -> int:
        return int(batch["row_ids"].shape[0])

    def units(self, batch: dict) -> int:
        """Loss units in a batch (see the reduction contract): response tokens."""
        if "logp_target" in batch:
            return int(batch["logp_target"].numel())
        return int((batch["labels"][:, 1:] != -100).sum())

    def loss(self, model, batch: dict) -> ObjectiveOutput:
        raise NotImplementedError


class SFTTask(Task):
    def loss(self, model, batch):
        pos = positions(batch, self.num_seqs(batch))
        logps = response_logprobs(model, batch, pos, self.fwd)
        return sequence_sft_loss(logps, pos.seq, pos.num_seqs)


class DPOTask(Task):
    """DPO on chosen+rejected in one forward; the reference is cached log-probs
    (``batch["ref_logps"]``), a frozen model or, with LoRA and no separate reference, the policy
    with its adapter disabled."""

    reference: torch.nn.Module | None = None
    ref_cache: "object | None" = None
    """A ``refcache.ReferenceLogps`` whose values the collate attaches as ``ref_logps``."""

    def collate(self, pad_id):
        base = pack_pref if self.packing else (lambda examples: collate_pref(examples, pad_id))
        cache = self.ref_cache
        if cache is None:
            return base

        def with_reference(examples):
            batch = base(examples)
            batch["ref_logps"] = cache.lookup(examples)  # type: ignore[attr-defined]
            return batch

        return with_reference

    def num_seqs(self, batch):
        return 2 * int(batch["row_ids"].shape[0])

    def units(self, batch):
        return int(batch["row_ids"].shape[0])

    def sequence_logps(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs ``[2n]`` (chosen then rejected) and token counts ``[2n]``."""
        pos = positions(batch, self.num_seqs(batch))
        logps = response_logprobs(model, batch, pos, self.fwd)
        return segment_sum(logps, pos.seq, pos.num_seqs), segment_count(pos.seq, pos.num_seqs)

    def reference_logps(self, model, batch) -> torch.Tensor:
        if self.reference is not None:
            with torch.no_grad():
                return self.sequence_logps(self.reference, batch)[0]
        with as_reference(model):
            return self.sequence_logps(model, batch)[0]

    def loss(self, model, batch):
        n = batch["row_ids"].shape[0]
        if "ref_logps" in batch:  # precomputed (cached) reference log-probs
            ref = batch["ref_logps"]
        else:
            ref = self.reference_logps(model, batch)
        sums, counts = self.sequence_logps(model, batch)
        c = self.cfg
        chosen_nll = -sums[:n] / counts[:n].clamp(min=1) if c.nll_coef > 0 else None
        return dpo_loss(
            sums[:n], sums[n:], ref[:n], ref[n:],
            beta=c.beta, loss_type=c.loss_type, label_smoothing=c.label_smoothing,
            chosen_nll=chosen_nll, nll_coef=c.nll_coef,
        )


class KDTask(Task):
    """Distillation from a frozen teacher sharing the tokenizer, on the positions that predict a
    response token (the *shifted* labels: the original's off-by-one is not copied). With
    ``kd_topk`` the teacher's top-k tokens come from the teacher cache (``teacher_cache``,
    attached by the collate) or from the teacher, online."""

    teacher: torch.nn.Module | None = None
    teacher_cache: "object | None" = None
    """A ``teachercache.TeacherTopK`` whose rows the collate attaches as ``teacher_topk_*``."""

    def collate(self, pad_id):
        base = super().collate(pad_id)
        cache = self.teacher_cache
        if cache is None:
            return base

        def with_teacher(examples):
            batch = base(examples)
            batch["teacher_topk_ids"], batch["teacher_topk_logps"] = cache.lookup(examples)  # type: ignore[attr-defined]
            return batch

        return with_teacher

    def teacher_topk(self, batch: dict, pos: Positions) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's top-k ``(ids, logps)`` ``[M, k]`` at the batch's response positions."""
        assert self.teacher is not None, "kd needs a teacher (or a teacher cache)"
        k, tau = self.cfg.kd_topk, self.cfg.temperature
        device = batch["input_ids"].device
        with torch.no_grad():
            if resolve_mode(self.teacher, self.fwd, device) == "plain":
                zt = forward_logits(self.teacher, batch)
                return teacher_topk(zt.reshape(-1, zt.shape[-1])[pos.index], lambda z: z, k, tau, self._chunk(zt.shape[-1]))
            ht = forward_hidden(self.teacher, batch)
            ht = ht.reshape(-1, ht.shape[-1])[pos.index]
            return teacher_topk(ht, _head_fn(self.teacher), k, tau, self._chunk(_head(self.teacher)[1].shape[0]))

    def _chunk(self, vocab: int) -> int:
        return self.fwd.chunk_size or auto_chunk_size(vocab)

    def loss(self, model, batch):
        c = self.cfg
        pos = positions(batch, self.num_seqs(batch))
        if c.kd_topk:
            return self._topk_loss(model, batch, pos)
        assert self.teacher is not None, "kd needs a teacher"
        kw = dict(kind=c.kd_loss, temperature=c.temperature, jsd_beta=c.jsd_beta)
        device = batch["input_ids"].device
        if "plain" in (resolve_mode(model, self.fwd, device), resolve_mode(self.teacher, self.fwd, device)):
            with torch.no_grad():
                zt = forward_logits(self.teacher, batch)
            zs = forward_logits(model, batch)
            zs, zt = (z.reshape(-1, z.shape[-1])[pos.index] for z in (zs, zt))
            ones = torch.ones(zs.shape[0], 1, dtype=torch.bool, device=device)
            per_pos = kd_loss(zs[:, None], zt[:, None], ones, **kw)
            losses = segment_sum(per_pos.losses, pos.seq, pos.num_seqs)
            units = segment_count(pos.seq, pos.num_seqs)
            metrics = {k: segment_sum(v, pos.seq, pos.num_seqs) / units.clamp(min=1)
                       for k, v in per_pos.metrics.items()}
            return ObjectiveOutput(losses=losses, units=units, metrics=metrics)
        with torch.no_grad():
            ht = forward_hidden(self.teacher, batch)
            ht = ht.reshape(-1, ht.shape[-1])[pos.index]
        hs = forward_hidden(model, batch)
        hs = hs.reshape(-1, hs.shape[-1])[pos.index]
        vocab = _head(model)[1].shape[0]
        return chunked_kd_loss(hs, ht, _head_fn(model), _head_fn(self.teacher), pos.seq, pos.num_seqs,
                               chunk_size=self._chunk(vocab), **kw)

    def _topk_loss(self, model, batch: dict, pos: Positions) -> ObjectiveOutput:
        if "teacher_topk_ids" in batch:
            ids, logps = batch["teacher_topk_ids"], batch["teacher_topk_logps"]
            if ids.shape[0] != pos.index.shape[0]:
                raise ValueError(f"teacher cache rows ({ids.shape[0]}) do not match the batch's response positions "
                                 f"({pos.index.shape[0]}): the cache was built with other data or collation")
        else:
            ids, logps = self.teacher_topk(batch, pos)
        kw = dict(temperature=self.cfg.temperature)
        if resolve_mode(model, self.fwd, batch["input_ids"].device) == "plain":
            zs = forward_logits(model, batch)
            zs = zs.reshape(-1, zs.shape[-1])[pos.index]
            return chunked_topk_kd_loss(zs, lambda z: z, ids, logps, pos.seq, pos.num_seqs,
                                        chunk_size=self._chunk(zs.shape[-1]), **kw)
        hs = forward_hidden(model, batch)
        hs = hs.reshape(-1, hs.shape[-1])[pos.index]
        return chunked_topk_kd_loss(hs, _head_fn(model), ids, logps, pos.seq, pos.num_seqs,
                                    chunk_size=self._chunk(_head(model)[1].shape[0]), **kw)


TASKS: dict[str, type[Task]] = {"sft": SFTTask, "dpo": DPOTask, "kd": KDTask}


def make_task(cfg: ObjectiveConfig, fwd: ForwardOptions | None = None, packing: bool = False) -> Task:
    return TASKS[cfg.kind](cfg, fwd or ForwardOptions(), packing)

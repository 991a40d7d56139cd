"""Model forwards for objectives: a batch in, log-probs (or the lm_head's inputs) at the positions
that predict a response token out. The pure loss functions of ``bipost.objectives`` take it from there.

The path never materialises full-vocabulary fp32 logits (``train.logits``):

1. the model runs with ``logits_to_keep=1`` and a hook takes the decoder's final hidden states;
2. only the positions that predict a response token are kept (``logp_index`` of a packed batch,
   or the shifted ``labels`` of a padded one: :func:`bipost.objectives.segments.response_targets`);
3. their log-probs come from the lm_head in chunks (``modeling.lm_head``; what ``auto`` picks),
   or, with ``train.logits=liger``, from Liger's fused linear cross-entropy on a GPU.

``plain`` (full logits through the model's own head) remains for models whose head does more than a
linear map (logit soft-capping or scaling) or is only usable inside the forward (ZeRO-3).

Batches are padded (``data.collate``) or packed (``data.packing``); a packed batch needs the
model's packed-aware attention (``modeling.attention.use_packed_attention``).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from bipost.modeling.attention import packed_kwargs
from bipost.modeling.lm_head import auto_chunk_size, chunked_token_logprobs, module_token_logprobs
from bipost.objectives.segments import response_targets, segment_count, segment_sum
from bipost.engine import ModelAccess

LOGITS_MODES = ("auto", "chunked", "liger", "plain")

Head = Callable[[torch.Tensor], torch.Tensor]
"""A function from the lm_head's inputs ``[m, H]`` (or logits ``[m, V]``) to logits ``[m, V]``."""


@dataclass
class ForwardOptions:
    """How log-probs come from hidden states (from ``train.logits*`` and ``model.compile``)."""

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


# ---------------------------------------------------------------- the model call
def model_inputs(batch: dict) -> dict:
    """What the model is called with: a packed row carries position ids and its layout and no 2D
    mask; a padded batch its attention mask."""
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
    base = ModelAccess.base_model(model)
    box: list[torch.Tensor] = []

    def keep(_module, _args, output):
        box.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = base.get_decoder().register_forward_hook(keep)
    try:
        model(**model_inputs(batch), use_cache=False, **_keep_one_logit(type(base)))
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


# ---------------------------------------------------------------- response positions
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


# ---------------------------------------------------------------- from hidden states to log-probs
_SCALED_HEAD_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                      "lm_head_multiplier")


def _head_is_linear_map(base) -> bool:
    """False when the model post-processes its lm_head output (soft-capping, scaling): those
    heads only run correctly through the model's own forward (``plain``)."""
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    return all(getattr(cfg, a, None) in (None, 1, 1.0) for a in _SCALED_HEAD_ATTRS)


def _liger_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except ImportError:
        return False
    return True


class Forward:
    """How an objective gets log-probs out of a model (``train.logits``), on the run's engine.

    Objectives receive one in their constructor and never touch lm_heads, wrappers or backends."""

    def __init__(self, opts: ForwardOptions | None = None, access: ModelAccess | None = None):
        self.opts = opts or ForwardOptions()
        self.access = access or ModelAccess()

    def mode(self, model, device: torch.device) -> str:
        """``plain`` | ``chunked`` | ``liger`` for this model."""
        base = self.access.base_model(model)
        if (self.opts.logits == "plain" or not _head_is_linear_map(base)
                or not self.access.head_usable_outside_forward(model)):
            return "plain"
        if self.opts.logits == "auto":
            # Measured on an H100 (bench/RESULTS.md): the own chunked path beats Liger's fused loss with
            # reduction="none" at a large vocabulary (Qwen2-0.5B shape: SFT 31.4k vs 26.4k tok/s, DPO
            # 48.4k vs 43.0k), so Liger runs only when asked for.
            return "chunked"
        if self.opts.logits == "liger" and not _liger_available(device):
            raise ValueError("train.logits=liger needs liger-kernel on a CUDA device (pip install 'bipost[liger]')")
        return self.opts.logits

    def chunk_size(self, vocab: int) -> int:
        return self.opts.chunk_size or auto_chunk_size(vocab)

    def head(self, model) -> Head:
        """The output head as a function of hidden states. A plain Linear head is applied through its
        (gathered) weight, never as a module: under FSDP2 a module call inside a checkpointed chunk
        would re-enter FSDP's hooks during the backward's recompute."""
        head, weight = self.access.output_head(model)
        if isinstance(head, torch.nn.Linear):
            bias = head.bias
            return lambda h: torch.nn.functional.linear(h, weight, bias)
        return head

    def head_inputs(self, model, batch: dict, pos: Positions) -> tuple[torch.Tensor, Head, int]:
        """``(x [M, *], head, chunk)``: what a chunked loss applies ``head`` to, chunk by chunk, to get
        the logits at ``pos`` — the hidden states and the lm_head, or (``plain``) the model's own
        logits and the identity."""
        if self.mode(model, batch["input_ids"].device) == "plain":
            logits = forward_logits(model, batch)
            return logits.reshape(-1, logits.shape[-1])[pos.index], _identity, self.chunk_size(logits.shape[-1])
        hidden = forward_hidden(model, batch)
        return (hidden.reshape(-1, hidden.shape[-1])[pos.index], self.head(model),
                self.chunk_size(self.access.head_rows(model)))

    def token_logprobs(self, model, batch: dict, pos: Positions, temperature: float = 1.0) -> torch.Tensor:
        """Log-prob ``[M]`` (fp32) of every response token of the batch under ``model``; with
        ``temperature`` T, under ``softmax(logits / T)`` (what sampling at T draws from: an online
        objective's policy). A linear head's ``h W^T + b`` over T is ``(h / T) W^T + b / T``, so
        the chunked paths scale their inputs and never hold the logits."""
        mode = self.mode(model, batch["input_ids"].device)
        if mode == "plain":
            logits = forward_logits(model, batch)
            flat = logits.reshape(-1, logits.shape[-1])[pos.index].float()
            if temperature != 1.0:
                flat = flat / temperature
            return flat.gather(1, pos.target[:, None]).squeeze(1) - torch.logsumexp(flat, dim=-1)
        hidden = forward_hidden(model, batch)
        h = hidden.reshape(-1, hidden.shape[-1])[pos.index]
        head, weight = self.access.output_head(model)
        bias = getattr(head, "bias", None)
        chunk = self.chunk_size(weight.shape[0])
        if not isinstance(head, torch.nn.Linear):  # e.g. a LoRA-adapted lm_head
            scaled = head if temperature == 1.0 else (lambda x: head(x) / temperature)
            return module_token_logprobs(h, scaled, pos.target, chunk)
        if temperature != 1.0:
            h = h / temperature
            bias = None if bias is None else bias / temperature
        if mode == "liger":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            nll = liger_fused_linear_cross_entropy(h, weight, pos.target, bias, reduction="none")
            return -nll.float()
        return chunked_token_logprobs(h, weight, pos.target, bias, chunk, compiled=self.opts.compile)

    def sequence_logps(self, model, batch: dict, num_seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs ``[S]`` and response token counts ``[S]`` of every sequence."""
        pos = positions(batch, num_seqs)
        logps = self.token_logprobs(model, batch, pos)
        return segment_sum(logps, pos.seq, num_seqs), segment_count(pos.seq, num_seqs)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x

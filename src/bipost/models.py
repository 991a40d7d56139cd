"""Load the policy (full or LoRA), DPO references and KD teachers from a hub name or a local path."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

from bipost.config import ModelConfig

log = logging.getLogger("bipost")


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_attn(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {path} has no EOS token; bipost ends every response with one")
    if tok.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id works; EOS is the usual choice.
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, cfg: ModelConfig, frozen: bool = False):
    """Any AutoModelForCausalLM. Frozen models (references, teachers) are in eval mode: no dropout."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=resolve_dtype(cfg.dtype),
        attn_implementation=resolve_attn(cfg.attn_implementation),
        trust_remote_code=cfg.trust_remote_code,
    )
    if frozen:
        model.eval()
        model.requires_grad_(False)
    return model


def load_policy(cfg: ModelConfig):
    """The trained model: full weights, or a peft LoRA wrapper around them."""
    model = load_causal_lm(cfg.path, cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.rank > 0:
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora.target_modules
        lora = LoraConfig(
            r=cfg.lora.rank,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules="all-linear" if targets == ["all-linear"] else list(targets),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    model.train()
    return model


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextlib.contextmanager
def as_reference(peft_model) -> Iterator[None]:
    """Run a LoRA policy as its own reference: adapter disabled, eval mode (no dropout), no grad.

    This is the "free" reference of a LoRA run: the base weights *are* the initial policy, so no
    second copy of the model is kept in memory. ``peft_model`` is the peft model itself (inside any
    DDP wrapper: ``ModelAccess.outer_module``); forwards may still go through the wrapper.
    """
    was_training = peft_model.training
    peft_model.eval()
    try:
        with torch.no_grad(), peft_model.disable_adapter():
            yield
    finally:
        peft_model.train(was_training)


def compile_layers(model) -> None:
    """``torch.compile`` each decoder layer in place. Shapes start static and turn dynamic on the
    first change (torch's automatic dynamic): fixed-length rows keep the leaner static code,
    packed rows of varying length recompile once."""
    inner = model.get_base_model() if is_peft(model) else model
    for layer in inner.get_decoder().layers:
        layer.compile()

"""Batched generation from token-id prompts with Hugging Face ``generate`` and its KV cache.

Used by online objectives (GRPO's rollouts) and by evaluation (greedy generations), for any causal
LM: a plain transformers model, a peft model, or one wrapped by DDP / DeepSpeed / torch.compile
(unwrapped to the module that has ``generate``; a peft wrapper is kept, so adapters stay active).

What is exact about it:

* **Greedy** (``temperature=0``) is HF's argmax decoding; no random number is drawn.
* **Sampling** never touches the global RNG. One seed is drawn from the caller's
  ``torch.Generator`` per call; a generator on the model's device, seeded with it, draws every
  token through a logits processor that applies HF's own temperature / top-k / top-p warpers and
  samples with ``torch.multinomial(..., generator=...)``, then hands ``generate`` a one-hot score
  row that its greedy step picks. So the samples are a function of the caller's generator state
  (kept in checkpoints: resume is exact) and of the call's arguments — including ``batch_size``,
  since one batch draws its rows' tokens together. HF's own sampling (``do_sample=True``) would
  draw from the global RNG instead.
* **Only the options given here apply.** A model's ``generation_config.json`` (its sampling
  defaults, a repetition penalty, ``no_repeat_ngram_size``, minimum lengths) is overridden with
  neutral values, so samples come from the policy's own distribution at ``temperature`` /
  ``top_k`` / ``top_p`` — what a policy gradient assumes. Options that are not overridden
  (forced or suppressed tokens, bad words, sequence bias, guidance, ``min_new_tokens``) are an error.

Prompts are left-padded with ``pad_id`` (the attention mask marks padding, and HF derives position
ids from it). ``num_generations`` completions per prompt come out prompt-major, so a prompt's
group is contiguous: completion ``i * n + j`` is sample ``j`` of prompt ``i``.

Sharded engines (FSDP2, ZeRO-3), where every forward is a collective: pass ``synced=True`` so a
rank whose sequences have all ended keeps stepping (HF's ``synced_gpus``) until every rank is done.
Every rank must then make the same number of ``generate`` calls: pass the same number of prompts
and ``batch_size`` on every rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

_FIXED_OPTIONS = ("bad_words_ids", "forced_bos_token_id", "forced_eos_token_id", "exponential_decay_length_penalty",
                  "suppress_tokens", "begin_suppress_tokens", "sequence_bias", "watermarking_config", "guidance_scale",
                  "min_new_tokens")
"""Generation-config fields that add logits processors and are not overridden here (no neutral value,
or, for ``min_new_tokens``, one that transformers warns about next to ``min_length``)."""
_NEUTRAL = {"min_new_tokens": 0, "guidance_scale": 1.0}
"""Values of :data:`_FIXED_OPTIONS` that change nothing (others: only ``None`` or empty)."""


@dataclass
class Generations:
    """The completions of one :func:`generate` call."""

    completion_ids: list[list[int]]
    """Generated token ids per completion, prompt-major (``i * n + j``: sample ``j`` of prompt ``i``);
    each ends at its first EOS, EOS included, or after ``max_new_tokens`` tokens."""
    truncated: list[bool]
    """True where no EOS was generated within ``max_new_tokens`` (the completion was cut)."""
    prompt_index: list[int]
    """The prompt each completion answers (``i`` for completion ``i * n + j``)."""
    seconds: float
    """Wall time of the generation (all batches)."""

    @property
    def num_tokens(self) -> int:
        """Generated tokens, EOS included, padding after EOS excluded."""
        return sum(len(c) for c in self.completion_ids)

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else 0.0


def generation_model(model):
    """The module to call ``generate`` on: inside DDP / DeepSpeed (``.module``) and torch.compile
    (``._orig_mod``) wrappers, keeping a peft wrapper (its ``generate`` runs the adapters)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


class _SampleWithGenerator:
    """A logits processor that samples the next token with its own ``torch.Generator`` and returns
    scores that are 0 at the sampled token and ``-inf`` elsewhere (so the greedy step picks it)."""

    def __init__(self, temperature: float, top_k: int, top_p: float, generator: torch.Generator):
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        # HF's warpers, in the order HF's own sampling applies them.
        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
        if top_k > 0:
            self.warpers.append(TopKLogitsWarper(top_k=top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=top_p))
        self.generator = generator

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.warpers(input_ids, scores).float(), dim=-1)
        tokens = torch.multinomial(probs, num_samples=1, generator=self.generator)
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens, 0.0)


def _device_of(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _generation_config(model, *, max_new_tokens: int, eos_ids: list[int], pad_id: int):
    from transformers import GenerationConfig

    defaults = getattr(model, "generation_config", None)
    if defaults is not None:
        fixed = [f for f in _FIXED_OPTIONS
                 if getattr(defaults, f, None) not in (None, [], {}) and getattr(defaults, f) != _NEUTRAL.get(f)]
        if fixed:
            raise ValueError(f"the model's generation_config sets {', '.join(fixed)}, which would change the sampled "
                             "distribution; bipost samples the policy itself: set them to None on "
                             "model.generation_config")
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, num_return_sequences=1,
        # The cache is what makes generation cheap; a config that disabled it for gradient
        # checkpointing does not apply in eval mode.
        use_cache=True,
        eos_token_id=eos_ids, pad_token_id=pad_id,
        # Neutral values, so the model's own generation defaults cannot alter the distribution.
        repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0, min_length=0, renormalize_logits=False,
        remove_invalid_values=False,
    )


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _cut_at_eos(tokens: list[int], eos: set[int]) -> tuple[list[int], bool]:
    for k, tok in enumerate(tokens):
        if tok in eos:
            return tokens[:k + 1], False
    return tokens, True


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    eos_id: int | Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    num_generations: int = 1,
    batch_size: int = 0,
    generator: torch.Generator | None = None,
    synced: bool | None = None,
) -> Generations:
    """Generate ``num_generations`` completions for each prompt (see the module docstring).

    Args:
        model: a causal LM (transformers, peft, or wrapped by DDP / DeepSpeed / torch.compile).
        prompts: token ids of each prompt (non-empty), e.g. a chat template with its generation prompt.
        pad_id: id used to left-pad prompts (masked out of attention).
        eos_id: id(s) that end a completion (e.g. ``tokenizer.eos_token_id``, or several).
        max_new_tokens: the most tokens generated per completion, >= 1.
        temperature: 0 for greedy decoding; > 0 samples from ``softmax(logits / temperature)``.
        top_p: nucleus sampling mass in (0, 1] (1: off); sampling only.
        top_k: keep the ``k`` most likely tokens (0: off); sampling only.
        num_generations: completions per prompt.
        batch_size: sequences (prompt x sample rows) per ``generate`` call; 0: all in one call.
        generator: the caller's ``torch.Generator``; required to sample. One seed is drawn from it
            per call (greedy draws none), so its state after the call determines the next call.
        synced: HF's ``synced_gpus`` (True under FSDP2 / ZeRO-3); ``None`` lets transformers decide.

    Returns:
        :class:`Generations` (completion ids cut after the first EOS, truncation flags, timing).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0 or num_generations < 1 or batch_size < 0:
        raise ValueError(f"top_k and batch_size must be >= 0 and num_generations >= 1, got top_k={top_k}, "
                         f"num_generations={num_generations}, batch_size={batch_size}")
    sampling = temperature > 0
    if sampling and generator is None:
        raise ValueError("sampling (temperature > 0) needs a torch.Generator owned by the caller (generator=...)")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token (e.g. BOS)")
    eos_ids = [int(eos_id)] if isinstance(eos_id, int) else [int(e) for e in eos_id]
    if not eos_ids:
        raise ValueError("eos_id must name at least one token")

    lm = generation_model(model)
    device = _device_of(lm)
    config = _generation_config(lm, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id)
    processors = None
    if sampling:
        from transformers import LogitsProcessorList

        assert generator is not None
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device))
        device_gen = torch.Generator(device=device)
        device_gen.manual_seed(seed)
        processors = LogitsProcessorList([_SampleWithGenerator(temperature, top_k, top_p, device_gen)])

    rows = [list(p) for p in prompts for _ in range(num_generations)]
    step = batch_size or max(1, len(rows))
    eos = set(eos_ids)
    completions: list[list[int]] = []
    truncated: list[bool] = []
    flags = [(m, m.training) for m in lm.modules()]
    lm.eval()
    start = time.perf_counter()
    try:
        for s in range(0, len(rows), step):
            ids, mask = _left_pad(rows[s:s + step], pad_id, device)
            kwargs = {} if synced is None else {"synced_gpus": synced}
            out = lm.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                              logits_processor=processors, **kwargs)
            for new in out[:, ids.shape[1]:].tolist():
                ids_cut, cut = _cut_at_eos(new, eos)
                completions.append(ids_cut)
                truncated.append(cut)
    finally:
        for m, was_training in flags:
            m.training = was_training
    seconds = time.perf_counter() - start
    index = [i for i in range(len(prompts)) for _ in range(num_generations)]
    return Generations(completion_ids=completions, truncated=truncated, prompt_index=index, seconds=seconds)

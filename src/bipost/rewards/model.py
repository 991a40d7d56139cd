"""A reward model as a reward function: any ``AutoModelForSequenceClassification`` with one label.

The text scored is the prompt followed by the completion: for conversational prompts the
reward model's chat template applied to ``prompt + [assistant completion]`` (the template adds its
own special tokens), for string prompts ``prompt + completion`` tokenized with the tokenizer's
special tokens (e.g. a leading BOS), as the model would see a training example. Scoring is batched
(``batch_size`` texts per forward, right-padded), without gradients, in eval mode.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from bipost.rewards.base import completion_text, is_conversational


class RewardModel:
    """Scores ``(prompt, completion)`` pairs with a sequence-classification model loaded from ``path``.

    Args:
        path: a local directory or hub name loadable by ``AutoModelForSequenceClassification``
            and ``AutoTokenizer``; the model must have ``num_labels == 1`` (its logit is the reward).
        batch_size: texts per forward.
        device: where the model runs; ``None``: the current CUDA device if there is one, else CPU.
        dtype: ``float32`` | ``bfloat16`` | ``float16`` | ``auto`` (as ``model.dtype``).
        max_length: truncate texts to this many tokens (``None``: no truncation).
        trust_remote_code: passed to ``from_pretrained``.
    """

    __name__ = "reward_model"

    def __init__(self, path: str, *, batch_size: int = 8, device: str | torch.device | None = None,
                 dtype: str = "float32", max_length: int | None = None, trust_remote_code: bool = False):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from bipost.models import resolve_dtype

        if batch_size < 1:
            raise ValueError(f"reward model batch_size must be >= 1, got {batch_size}")
        self.path, self.batch_size, self.max_length = path, batch_size, max_length
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code)
        if model.config.num_labels != 1:
            raise ValueError(f"reward model {path}: expected one output (num_labels=1), got {model.config.num_labels}")
        if self.tokenizer.pad_token_id is None:
            # Batching needs a pad id; the model finds each row's last real token by it.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.model = model.to(self.device).eval().requires_grad_(False)

    def texts(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[str]:
        """The texts scored (see the module docstring)."""
        out = []
        for p, c in zip(prompts, completions):
            if is_conversational(p):
                messages = list(p) + [{"role": "assistant", "content": completion_text(c)}]
                out.append(self.tokenizer.apply_chat_template(messages, tokenize=False))
            else:
                out.append(str(p) + completion_text(c))
        return out

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
        texts = self.texts(prompts, completions)
        special = not (prompts and is_conversational(prompts[0]))
        scores: list[float] = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[s:s + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=self.max_length is not None, max_length=self.max_length,
                                 add_special_tokens=special)
            logits = self.model(**enc.to(self.device)).logits
            scores.extend(logits[:, 0].float().tolist())
        return scores

"""Examples → padded tensors.

Batches are right-padded with ``pad_id``. ``labels`` equal ``input_ids`` on response tokens
(EOS included) and are ``-100`` on prompt and padding positions. Labels are *unshifted*: the
loss compares the logits at position ``t`` with ``labels[t + 1]``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from bipost.data.types import IGNORE_INDEX, PrefExample, SFTExample


def _pad(sequences: list[tuple[tuple[int, ...], tuple[int, ...]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``(prompt_ids, response_ids)`` pairs into input_ids / attention_mask / labels."""
    width = max(len(p) + len(r) for p, r in sequences)
    n = len(sequences)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for i, (p, r) in enumerate(sequences):
        length = len(p) + len(r)
        input_ids[i, :length] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[i, :length] = 1
        labels[i, len(p):length] = input_ids[i, len(p):length]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_sft(examples: Sequence[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask``/``labels`` ``[B, T]`` (long) and ``row_ids`` ``[B]``."""
    if not examples:
        raise ValueError("collate_sft: empty batch")
    batch = _pad([(e.prompt_ids, e.response_ids) for e in examples], pad_id)
    batch["row_ids"] = torch.tensor([e.row_id for e in examples], dtype=torch.long)
    return batch


def collate_pref(examples: Sequence[PrefExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen and rejected in one batch: ``[2B, T]`` tensors, rows ``0..B-1`` are prompt+chosen
    and rows ``B..2B-1`` prompt+rejected (row ``i`` and ``B + i`` are one pair); ``row_ids`` ``[B]``."""
    if not examples:
        raise ValueError("collate_pref: empty batch")
    pairs = [(e.prompt_ids, e.chosen_ids) for e in examples] + [(e.prompt_ids, e.rejected_ids) for e in examples]
    batch = _pad(pairs, pad_id)
    batch["row_ids"] = torch.tensor([e.row_id for e in examples], dtype=torch.long)
    return batch

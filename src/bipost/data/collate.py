"""Examples → padded tensors.

Batches are right-padded with ``pad_id``. ``labels`` equal ``input_ids`` on response tokens
(EOS included) and are ``-100`` on prompt and padding positions. Labels are *unshifted*: the
loss compares the logits at position ``t`` with ``labels[t + 1]``.

Token fields may be numpy arrays (examples read from a token store) or tuples (examples built
in memory); rows are filled with one numpy slice assignment per sequence part, never token by token.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from bipost.data.types import IGNORE_INDEX, PrefExample, SFTExample


def _pad(sequences: list[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``(prompt_ids, response_ids)`` pairs into input_ids / attention_mask / labels."""
    lengths = np.array([(len(p), len(r)) for p, r in sequences], dtype=np.int64).reshape(-1, 2)
    total = lengths.sum(1)
    n, width = len(sequences), int(total.max())
    input_ids = np.full((n, width), pad_id, dtype=np.int64)
    labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    for i, (p, r) in enumerate(sequences):
        lp, end = lengths[i, 0], total[i]
        input_ids[i, :lp] = p
        input_ids[i, lp:end] = r
        labels[i, lp:end] = r
    attention_mask = (np.arange(width)[None, :] < total[:, None]).astype(np.int64)
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels)}


def _row_ids(examples: Sequence) -> torch.Tensor:
    return torch.tensor([e.row_id for e in examples], dtype=torch.long)


def collate_sft(examples: Sequence[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask``/``labels`` ``[B, T]`` (long) and ``row_ids`` ``[B]``."""
    if not examples:
        raise ValueError("collate_sft: empty batch")
    batch = _pad([(e.prompt_ids, e.response_ids) for e in examples], pad_id)
    batch["row_ids"] = _row_ids(examples)
    return batch


def collate_pref(examples: Sequence[PrefExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen and rejected in one batch: ``[2B, T]`` tensors, rows ``0..B-1`` are prompt+chosen
    and rows ``B..2B-1`` prompt+rejected (row ``i`` and ``B + i`` are one pair); ``row_ids`` ``[B]``."""
    if not examples:
        raise ValueError("collate_pref: empty batch")
    pairs = [(e.prompt_ids, e.chosen_ids) for e in examples] + [(e.prompt_ids, e.rejected_ids) for e in examples]
    batch = _pad(pairs, pad_id)
    batch["row_ids"] = _row_ids(examples)
    return batch

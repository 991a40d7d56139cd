"""Padding-free packing: a micro-batch becomes ONE row of its sequences laid end to end.

``collate_sft`` / ``collate_pref`` (collate.py) right-pad every sequence to the longest one;
with variable lengths much of that compute is padding. The packed collates here hold exactly
the same examples without a single padding token:

* SFT: ``[p_1 r_1 | p_2 r_2 | ...]``, position ids restarting at 0 for every sequence.
* DPO: ``[p_1 c_1 | p_2 c_2 | ... | r_1 | r_2 | ...]``: the prompt a pair shares is laid out
  (and computed) once; ``r_i`` continues ``p_i``'s position ids and attends to ``p_i`` and itself.

Attention never crosses sequences: the batch carries a :class:`PackedLayout`, which the model's
packed-aware attention (``bipost.modeling.attention``) honours, and the model is never given a 2D
attention mask. Which position predicts which token is explicit, because the shared prompt
breaks the "next position" rule (the last prompt position predicts the first token of *both*
responses):

* ``logp_index`` ``[M]``: row positions whose hidden state predicts a response token,
* ``logp_target`` ``[M]``: that token,
* ``logp_seq`` ``[M]``: its sequence: example ``i`` for SFT; for DPO chosen ``i`` and rejected
  ``n + i`` (the row order of ``collate_pref``), sorted ascending.

These are exactly the positions and targets of the padded batch's shifted labels, so per-sequence
log-prob sums (and every loss built on them) are the padded batch's, up to float rounding.
``attention_mask`` is all ones ``[1, T]`` (it counts the tokens actually processed) and
``row_ids`` is as in the padded collates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from bipost.data.types import PrefExample, SFTExample


@dataclass
class PackedLayout:
    """Segments of one packed row (see the module docstring), built on the CPU by the collate."""

    segments: list[tuple[int, int, int, int]]
    """``(q0, q1, p0, p1)`` per segment, in row order; ``p0 == p1`` means no prefix."""
    _device_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        pos, seen_prefix = 0, False
        for q0, q1, p0, p1 in self.segments:
            if q0 != pos or q1 <= q0:
                raise ValueError(f"packed segments must tile the row in order; got {self.segments}")
            if p1 > p0:
                if not any(a <= p0 and p1 <= b <= q0 for a, b, _, _ in self.segments):
                    raise ValueError(f"a prefix must lie inside one earlier segment; got {(q0, q1, p0, p1)}")
                seen_prefix = True
            elif seen_prefix:
                raise ValueError("segments without a prefix must come before those with one")
            pos = q1

    @property
    def length(self) -> int:
        return self.segments[-1][1] if self.segments else 0

    @property
    def split(self) -> int:
        """Row position where the segments with a prefix begin (``length`` if none has one)."""
        for q0, _, p0, p1 in self.segments:
            if p1 > p0:
                return q0
        return self.length

    def varlen_args(self, device: torch.device) -> dict:
        """Cumulative lengths and key indices for the two varlen groups, cached per device."""
        if device in self._device_cache:
            return self._device_cache[device]
        plain = [(q0, q1) for q0, q1, p0, p1 in self.segments if p1 <= p0]
        pref = [(q0, q1, p0, p1) for q0, q1, p0, p1 in self.segments if p1 > p0]
        args: dict = {"split": self.split}
        if plain:
            lens = torch.tensor([q1 - q0 for q0, q1 in plain])
            args["plain"] = (_cumsum32(lens).to(device, non_blocking=True), int(lens.max()))
        if pref:
            split = self.split
            qlens = torch.tensor([q1 - q0 for q0, q1, _, _ in pref])
            klens = torch.tensor([q1 - q0 + p1 - p0 for q0, q1, p0, p1 in pref])
            kidx = torch.cat([torch.cat([torch.arange(p0, p1), torch.arange(q0, q1)]) for q0, q1, p0, p1 in pref])
            args["prefixed"] = (split, _cumsum32(qlens).to(device, non_blocking=True),
                                _cumsum32(klens).to(device, non_blocking=True), int(qlens.max()),
                                int(klens.max()), kidx.to(device, non_blocking=True))
        self._device_cache[device] = args
        return args


def _cumsum32(lens: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32)


def _targets(start: int, prompt_len: int, response: Sequence[int], seq: int,
             first_pos: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """``(index, target, seq)``: the positions predicting ``response`` laid out at
    ``start + prompt_len`` and the tokens they predict; the first response token is predicted from
    ``first_pos`` (default: the position just before it)."""
    target = np.asarray(response, dtype=np.int64)
    index = np.arange(start + prompt_len - 1, start + prompt_len - 1 + len(target), dtype=np.int64)
    if prompt_len == 0:  # a sequence's first token is never predicted (as with padded labels)
        return index[1:], target[1:], seq
    if first_pos is not None and len(index):
        index[0] = first_pos
    return index, target, seq


class _Row:
    """One packed row being laid out: token parts, position parts, segments and loss targets."""

    def __init__(self) -> None:
        self.length = 0
        self.ids: list = []
        self.pos: list[np.ndarray] = []
        self.segments: list[tuple[int, int, int, int]] = []
        self.targets: list[tuple[np.ndarray, np.ndarray, int]] = []

    def add(self, parts: Sequence[Sequence[int]], first_pos: int, prefix: tuple[int, int] = (0, 0)) -> int:
        """Lay ``parts`` out as one segment whose position ids start at ``first_pos``; its start."""
        start = self.length
        n = sum(len(p) for p in parts)
        self.ids += parts
        self.pos.append(np.arange(first_pos, first_pos + n, dtype=np.int64))
        self.segments.append((start, start + n, *prefix))
        self.length += n
        return start

    def finish(self, row_ids: list[int]) -> dict:
        # Targets were added sequence by sequence with positions ascending: already in the
        # (sequence, position) order the module docstring promises.
        ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in self.ids])
        index = np.concatenate([t[0] for t in self.targets])
        target = np.concatenate([t[1] for t in self.targets])
        seq = np.concatenate([np.full(len(t[0]), t[2], dtype=np.int64) for t in self.targets])
        return {
            "input_ids": torch.from_numpy(ids)[None],
            "position_ids": torch.from_numpy(np.concatenate(self.pos))[None],
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "packed_layout": PackedLayout(self.segments),
            "logp_index": torch.from_numpy(index),
            "logp_target": torch.from_numpy(target),
            "logp_seq": torch.from_numpy(seq),
            "row_ids": torch.tensor(row_ids, dtype=torch.long),
        }


def pack_sft(examples: Sequence[SFTExample]) -> dict:
    """One packed row of SFT examples (see the module docstring)."""
    if not examples:
        raise ValueError("pack_sft: empty batch")
    row = _Row()
    for i, e in enumerate(examples):
        start = row.add([e.prompt_ids, e.response_ids], 0)
        row.targets.append(_targets(start, len(e.prompt_ids), e.response_ids, i))
    return row.finish([e.row_id for e in examples])


def pack_pref(examples: Sequence[PrefExample]) -> dict:
    """One packed row of preference pairs with each shared prompt laid out once."""
    if not examples:
        raise ValueError("pack_pref: empty batch")
    if any(not len(e.prompt_ids) for e in examples):
        return _unshared_pref(examples)  # nothing to share; and every segment below has a prefix
    n = len(examples)
    row = _Row()
    prompt_at: list[int] = []
    for i, e in enumerate(examples):  # prompt + chosen
        start = row.add([e.prompt_ids, e.chosen_ids], 0)
        prompt_at.append(start)
        row.targets.append(_targets(start, len(e.prompt_ids), e.chosen_ids, i))
    for i, e in enumerate(examples):  # rejected, attending to its prompt
        p = len(e.prompt_ids)
        start = row.add([e.rejected_ids], p, prefix=(prompt_at[i], prompt_at[i] + p))
        # r[0] is predicted by the prompt's last position (inside the chosen segment), r[j] by
        # the rejected position before it.
        row.targets.append(_targets(start - p, p, e.rejected_ids, n + i, first_pos=prompt_at[i] + p - 1))
    return row.finish([e.row_id for e in examples])


def _unshared_pref(examples: Sequence[PrefExample]) -> dict:
    """Pairs some of which have an empty prompt (nothing to share): every sequence on its own."""
    n = len(examples)
    as_sft = [SFTExample(e.row_id, e.prompt_ids, e.chosen_ids) for e in examples] + \
             [SFTExample(e.row_id, e.prompt_ids, e.rejected_ids) for e in examples]
    batch = pack_sft(as_sft)
    batch["row_ids"] = batch["row_ids"][:n]
    return batch


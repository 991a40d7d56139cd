"""Examples in token space, as the data layer hands them to the training loop.

Each example keeps the ``row_id`` of the row it came from in the *original* dataset (its
index before ``max_samples``, skipping or splitting), so that every per-row decision (the
selector's weights, filtering) refers to the source row, never to a shifted position.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100
"""Label value of positions that carry no loss (collated labels are unshifted: the logits at ``t``
predict ``labels[t + 1]``)."""


@dataclass(frozen=True)
class SFTExample:
    """Prompt + response. ``response_ids`` ends with exactly one EOS; only it carries loss."""

    row_id: int
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass(frozen=True)
class PrefExample:
    """A preference pair: chosen and rejected share the very same ``prompt_ids``."""

    row_id: int
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

"""Examples in token space, as the data layer hands them to the training loop.

Each example keeps the ``row_id`` of the row it came from in the *original* dataset (its
index before ``max_samples``, skipping or splitting), so that every per-row decision (the
selector's weights, filtering) refers to the source row, never to a shifted position.

An example type is a frozen dataclass whose field annotations say how the token store
(``data/store.py``) keeps each field; a new type needs nothing else:

* ``TokenIds``: a ragged sequence of token ids (stored as ``uint16`` when the vocabulary fits,
  else ``int32``);
* ``Ragged[np.float32]`` (any numpy dtype): a ragged array of numbers, 1-D or with fixed
  trailing dimensions (e.g. ``[n_tokens, k]`` top-k ids or log-probs; the trailing shape is
  taken from the data and must be the same in every row);
* ``int`` / ``float`` / ``bool``: one scalar per row (``int64`` / ``float64`` / ``bool``);
* ``str``: one string per row (stored as UTF-8 bytes).

Examples built by the encoders (``data/tokenize.py``) hold tuples of ints; examples read from a
store hold read-only numpy arrays (views of the memory-mapped files). Code that consumes
examples must accept both: ``len(x)``, indexing, ``np.asarray(x)`` and iteration work on either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Sequence

import numpy as np


@dataclass(frozen=True)
class Ragged:
    """Annotation marker: a ragged per-row array of ``dtype`` (``"token"``: the store's token dtype)."""

    dtype: Any

    def __class_getitem__(cls, dtype: Any) -> Any:
        return Annotated[np.ndarray, cls(dtype)]


TokenIds = Annotated[Sequence[int], Ragged("token")]
"""Token ids of one part of an example: a tuple of ints (encoded) or a read-only numpy array (stored)."""

IGNORE_INDEX = -100
"""Label value of positions that carry no loss (collated labels are unshifted: the logits at ``t``
predict ``labels[t + 1]``)."""


@dataclass(frozen=True)
class SFTExample:
    """Prompt + response. ``response_ids`` ends with exactly one EOS; only it carries loss."""

    row_id: int
    prompt_ids: TokenIds
    response_ids: TokenIds

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass(frozen=True)
class PrefExample:
    """A preference pair: chosen and rejected share the very same ``prompt_ids``."""

    row_id: int
    prompt_ids: TokenIds
    chosen_ids: TokenIds
    rejected_ids: TokenIds

    def __len__(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def as_tuples(example: Any) -> Any:
    """``example`` with every numpy array field turned into a tuple of Python numbers (nested for
    trailing dimensions): comparable with ``==`` and hashable, like an example built in memory.
    Examples read from a store hold arrays, and ``==`` on arrays is elementwise."""
    import dataclasses

    return dataclasses.replace(example, **{
        f.name: tuple(v.tolist()) for f in dataclasses.fields(example)
        if isinstance(v := getattr(example, f.name), np.ndarray)})

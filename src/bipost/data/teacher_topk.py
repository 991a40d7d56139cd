"""Teacher top-k log-probs stored with the data: the example type of KD without a teacher model.

A row is an SFT row (``input_output``, ``prompt_completion`` or ``messages``) plus two columns of
``[n][k]`` nested lists (a list per position, ``k`` entries each, the same ``k`` in every row),
in one of two layouts:

* **bipost** (what ``bipost distill-topk`` writes): ``teacher_topk_ids`` (token ids) and
  ``teacher_topk_logps`` (the teacher's log-softmax at those ids, over its whole vocabulary).
  One row per position that predicts a response token, in order: row ``j`` is the teacher's
  distribution over response token ``j`` given the prompt and response tokens ``< j`` (with an
  empty prompt the first response token is never predicted and the rows start at token 1). These
  are exactly the positions, in exactly the order, of the chunked KD path (``kinds/kd.py``) and of
  the teacher cache.
* **axolotl** (its KD plugin's ``target_token_ids`` / ``target_logprobs``; ``target_mask`` is not
  read): one row per token of the whole tokenized sequence (prompt + response), row ``t`` being
  the distribution over token ``t + 1``; the rows predicting the response are
  ``len(prompt) - 1 .. len(sequence) - 2``, a final row (past the end) is ignored.

The rows must describe *bipost's* tokenization of the row (the policy's tokenizer, chat template,
one BOS, one EOS): their number is checked against it, exactly — ``n`` response positions (bipost)
or the sequence's length, with or without the final row (axolotl) — and a mismatch is a
:class:`DataError` naming the file, row and field. A response truncated to ``max_len`` keeps the
rows of its first positions: a teacher row depends only on the tokens before it, so the rows
computed for the full response are the truncated response's too. Every row used is checked: ids in
``[0, len(tokenizer))`` and distinct, log-probs finite and <= 0.

Temperature: log-probs are stored as the teacher gave them (``distill-topk`` writes temperature 1);
the ``kd`` kind rescales them to its ``temperature`` (``stored_temperature``), which is exact for the
renormalized top-k distribution it distils from: ``softmax(z / T)`` restricted to the top-k and
renormalized is ``p_1^(1 / T)`` renormalized (the top-k set is the same at every temperature).

A null column is a per-row skip (``distill-topk`` writes nulls for rows it skipped); a missing one
is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from bipost.config import DataConfig
from bipost.data.collate import collate_sft
from bipost.data.examples import SFT, ExampleType
from bipost.data.formats import format_row
from bipost.data.packing import pack_sft
from bipost.data.sources import DataError, Row
from bipost.data.tokenize import TokenPolicy, encode_sft_rows
from bipost.data.types import Ragged, TokenIds

BIPOST = ("teacher_topk_ids", "teacher_topk_logps")
"""The bipost layout's columns: one row per response position."""
AXOLOTL = ("target_token_ids", "target_logprobs")
"""axolotl's KD columns: one row per sequence position."""
LOGP_TOLERANCE = 1e-3
"""How far above 0 a stored log-prob may round."""


@dataclass(frozen=True)
class TopKExample:
    """An SFT example with its teacher's top-k at every position that predicts a response token."""

    row_id: int
    prompt_ids: TokenIds
    response_ids: TokenIds
    teacher_topk_ids: Ragged[np.int32]
    """``[n, k]``: the teacher's k most likely token ids at each response position."""
    teacher_topk_logps: Ragged[np.float32]
    """``[n, k]``: their log-probs (at the temperature they were stored at)."""

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass(frozen=True)
class TopKText:
    """A row's text parts and its stored top-k, as the encoder takes them."""

    prompt: str
    response: str
    ids: np.ndarray
    logps: np.ndarray
    layout: str
    """``bipost`` or ``axolotl``."""
    where: str
    """The row's location, for errors found once it is tokenized."""


def _layout(row: Row) -> tuple[str, tuple[str, str]]:
    for name, keys in (("bipost", BIPOST), ("axolotl", AXOLOTL)):
        if keys[0] in row.data or keys[1] in row.data:
            missing = [k for k in keys if k not in row.data]
            if missing:
                raise DataError(f"{row.where()}: missing key '{missing[0]}' (it goes with '{keys[0]}' / "
                                f"'{keys[1]}')")
            return name, keys
    raise DataError(f"{row.where()}: no teacher top-k columns: expected '{BIPOST[0]}' and '{BIPOST[1]}' (bipost "
                    f"distill-topk) or '{AXOLOTL[0]}' and '{AXOLOTL[1]}' (axolotl); the row has keys "
                    f"{sorted(row.data)}")


def _matrix(row: Row, key: str, value: Any, integer: bool) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except ValueError:
        arr = None
    if arr is None or arr.dtype == object or (arr.ndim != 2 and arr.size):
        raise DataError(f"{row.where()}, field '{key}': expected a list of equally long lists of numbers "
                        f"(one list of k entries per position)")
    if arr.ndim != 2:  # no position at all
        arr = arr.reshape(0, 0)
    if len(arr) and not arr.shape[1]:
        raise DataError(f"{row.where()}, field '{key}': empty lists; each position needs its k >= 1 entries")
    if integer and arr.size and arr.dtype.kind not in "iu":
        raise DataError(f"{row.where()}, field '{key}': token ids must be integers, not {arr.dtype.name}")
    if not integer and arr.size and arr.dtype.kind not in "iuf":
        raise DataError(f"{row.where()}, field '{key}': log-probs must be numbers, not {arr.dtype.name}")
    return arr


def format_topk_row(row: Row, fmt: str, cfg: DataConfig, tokenizer: Any = None) -> TopKText | str:
    """An SFT row's text parts with its top-k columns (the shapes checked), or a skip reason."""
    text = format_row(row, fmt, cfg, tokenizer)
    if isinstance(text, str):
        return text
    layout, (ids_key, logps_key) = _layout(row)
    for key in (ids_key, logps_key):
        if row.data[key] is None:
            return f"null '{key}'"
    ids = _matrix(row, ids_key, row.data[ids_key], integer=True)
    logps = _matrix(row, logps_key, row.data[logps_key], integer=False)
    if ids.shape != logps.shape:
        raise DataError(f"{row.where()}: '{ids_key}' is {list(ids.shape)} but '{logps_key}' is {list(logps.shape)}; "
                        f"both hold one row of k entries per position")
    return TopKText(text.prompt, text.response, ids, logps, layout, row.where())  # type: ignore[union-attr]


def _rows(item: tuple, prompt_len: int, response_len: int, cut: bool) -> tuple[slice, str]:
    """The stored rows of the example's response positions, or the reason they do not fit."""
    _, _, _, ids, _, layout, _ = item
    have = len(ids)
    start = max(prompt_len - 1, 0)  # the position predicting the first predicted response token
    need = prompt_len + response_len - 1 - start
    if layout == "bipost":
        if have == need or (cut and have > need):
            return slice(0, need), ""
        return slice(0), f"{have} rows, but the row tokenizes to {need} response positions"
    seq = prompt_len + response_len
    if have in (seq - 1, seq) or (cut and have > seq):
        return slice(start, start + need), ""
    return slice(0), f"{have} rows, but the row tokenizes to {seq} tokens (rows for {seq - 1} or {seq} expected)"


def encode_topk_rows(items: Sequence[tuple], tokenizer: Any, max_len: int) -> list[tuple[TopKExample | str, bool]]:
    """Encode ``(row_id, prompt, response, ids, logps, layout, where)`` items as the SFT encoder does,
    keeping the stored rows of the response positions (see the module docstring for the checks)."""
    policy = TokenPolicy.of(tokenizer)
    vocab = len(policy.tokenizer)
    encoded = encode_sft_rows([it[:3] for it in items], policy, max_len)
    out: list[tuple[TopKExample | str, bool]] = []
    k_first: tuple[int, str] | None = None
    for item, (example, cut) in zip(items, encoded):
        if isinstance(example, str):
            out.append((example, cut))
            continue
        row_id, _, _, ids, logps, layout, where = item
        keys = BIPOST if layout == "bipost" else AXOLOTL
        span, problem = _rows(item, len(example.prompt_ids), len(example.response_ids), cut)
        if problem:
            raise DataError(f"{where}, field '{keys[0]}': {problem}. The stored top-k must be computed on this "
                            f"tokenization (the policy's tokenizer and chat template, data.max_len >= the one "
                            f"it was written with)")
        ids, logps = ids[span], logps[span]
        _check_values(ids, logps, vocab, where, keys)
        if len(ids):
            if k_first is None:
                k_first = (ids.shape[1], where)
            elif ids.shape[1] != k_first[0]:
                raise DataError(f"{where}, field '{keys[0]}': top-{ids.shape[1]} rows, but {k_first[1]} has "
                                f"top-{k_first[0]}; every row must store the same k")
        out.append((TopKExample(row_id, example.prompt_ids, example.response_ids, ids.astype(np.int32),
                                logps.astype(np.float32)), cut))
    return out


def _check_values(ids: np.ndarray, logps: np.ndarray, vocab: int, where: str, keys: tuple[str, str]) -> None:
    if not ids.size:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise DataError(f"{where}, field '{keys[0]}': token id {hi if hi >= vocab else lo} is outside the "
                        f"vocabulary of {vocab} tokens (the teacher must share the policy's tokenizer)")
    ordered = np.sort(ids, axis=1)
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        pos = int(np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(1))[0])
        raise DataError(f"{where}, field '{keys[0]}': response position {pos} lists a token id twice")
    bad = ~np.isfinite(logps) | (logps > LOGP_TOLERANCE)
    if bad.any():
        pos = int(np.flatnonzero(bad.any(1))[0])
        raise DataError(f"{where}, field '{keys[1]}': response position {pos} holds {float(logps[pos][bad[pos]][0])}; "
                        f"log-probs must be finite and <= 0")


def _attach(batch: dict, examples: Sequence[TopKExample]) -> dict:
    """The examples' rows, example after example: the order of the batch's response positions."""
    batch["teacher_topk_ids"] = torch.from_numpy(
        np.concatenate([np.asarray(e.teacher_topk_ids, dtype=np.int64) for e in examples]))
    batch["teacher_topk_logps"] = torch.from_numpy(
        np.concatenate([np.asarray(e.teacher_topk_logps, dtype=np.float32) for e in examples]))
    return batch


def collate_topk(examples: Sequence[TopKExample], pad_id: int) -> dict:
    """``collate_sft`` plus ``teacher_topk_ids`` (long) / ``teacher_topk_logps`` ``[M, k]``."""
    return _attach(collate_sft(examples, pad_id), examples)  # type: ignore[arg-type]


def pack_topk(examples: Sequence[TopKExample]) -> dict:
    """``pack_sft`` plus the stored rows (the packed row's ``logp_*`` order is the same)."""
    return _attach(pack_sft(examples), examples)  # type: ignore[arg-type]


TOPK = ExampleType("kd_topk", TopKExample, SFT.formats,
                   f"{SFT.needs} with teacher top-k columns ({BIPOST[0]}/{BIPOST[1]} or {AXOLOTL[0]}/{AXOLOTL[1]})",
                   encode_topk_rows, collate_topk, pack_topk, format_topk_row, reference="response_ids")
"""SFT rows with stored teacher top-k (``kd`` with ``teacher_logprobs: data``)."""


def stored_k(examples: Any) -> int | None:
    """The ``k`` of a store view's ``teacher_topk_ids`` (None when it holds no row)."""
    store = getattr(examples, "store", None)
    if store is None:
        return next((len(e.teacher_topk_ids[0]) for e in examples if len(e.teacher_topk_ids)), None)
    column = next(c for c in store.columns if c.name == "teacher_topk_ids")
    return column.trailing[0] if column.trailing else None

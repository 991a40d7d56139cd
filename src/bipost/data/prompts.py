"""Prompt examples for online objectives (GRPO): a prompt to generate from, and the row's other
columns for the reward functions.

Formats (``data.format``; ``auto`` picks ``prompt`` when the first row has ``data.prompt_key``, else
``input_output`` when it has ``data.input_key``):

* ``prompt`` (TRL's GRPO data sets): ``prompt_key`` holds a string, used verbatim, or a
  conversation (a list of ``{"role", "content"}`` messages) rendered with the tokenizer's chat
  template and its generation prompt;
* ``input_output`` (SFT data reused for rewards): the prompt is ``input_template.format(input)``.

Every *other* column of the row (e.g. ``answer``, or the ``output`` of ``input_output`` rows) is
kept, as one JSON object per row, and handed to the reward functions by name, one value per
completion. The prompt itself is kept as the reward functions receive it (the string or the list of
messages, as JSON). Values that JSON cannot hold (e.g. a Parquet timestamp) are kept as their text.

Encoding: the prompt's token ids with the tokenizer's BOS rule (``data.tokenize.TokenPolicy``).
``data.max_len`` is the longest prompt kept, in tokens: a longer prompt is skipped as ``too long``
(cutting it would change the question); completions are bounded by the objective's
``max_new_tokens``. A null, empty or non-string prompt, or a malformed conversation, is a skip with
its reason, as in ``data.formats``; a missing prompt key is an error naming the file and the row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from bipost.config import DataConfig
from bipost.data.examples import ExampleType
from bipost.data.formats import _render, _require, _shape, _Skip, _string, _turns
from bipost.data.packing import _Row, _targets
from bipost.data.sources import DataError, Row
from bipost.data.tokenize import TOO_LONG, TokenPolicy
from bipost.data.types import SFTExample, TokenIds

EMPTY_PROMPT = "empty prompt after tokenization"
"""Skip reason of a prompt that tokenizes to nothing (and the tokenizer adds no BOS)."""


@dataclass(frozen=True)
class PromptExample:
    """A prompt to sample completions for, with what the reward functions need to score them."""

    row_id: int
    prompt_ids: TokenIds
    """The prompt's token ids (BOS rule applied), as generation is conditioned on them."""
    prompt: str
    """JSON of the prompt as the reward functions get it: a string, or a list of messages."""
    columns: str
    """JSON object of the row's other columns (reward function arguments by name)."""

    def __len__(self) -> int:
        return len(self.prompt_ids)


@dataclass(frozen=True)
class PromptText:
    """A prompt's text parts (``format_row``'s output; the encoder's item after the row id)."""

    text: str
    """What is tokenized: the string, or the conversation rendered by the chat template."""
    prompt: str
    """JSON of the prompt value (string or messages)."""
    columns: str
    """JSON object of the other columns."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, default=_jsonable, ensure_ascii=False)


def detect_prompt_format(keys: Iterable[str], cfg: DataConfig) -> Optional[str]:
    """``prompt`` when the row has ``prompt_key``, ``input_output`` when it has ``input_key``."""
    keys = set(keys)
    if cfg.prompt_key in keys:
        return "prompt"
    if cfg.input_key in keys:
        return "input_output"
    return None


def _fill(template: str, value: str) -> str:
    try:
        return template.format(value)
    except (IndexError, KeyError, ValueError) as e:
        raise DataError(f"data.input_template {template!r} can't be filled with str.format (use '{{}}' for the "
                        f"input and '{{{{'/'}}}}' for literal braces): {e}") from e


def format_prompt_row(row: Row, fmt: str, cfg: DataConfig, tokenizer: Any = None) -> PromptText | str:
    """The prompt and columns of ``row`` in format ``fmt``, or the reason string when it is skipped."""
    try:
        if fmt == "prompt":
            key = cfg.prompt_key
            value = _require(row, key)
            if _shape(row, key, value) == "str":
                text = value
            else:
                turns = _turns(key, value)
                if turns[-1]["role"] == "assistant":
                    raise _Skip(f"last turn of '{key}' is the assistant's (a prompt ends with the user's)")
                text = _render(row, tokenizer, turns, generation_prompt=True)
                value = turns
        elif fmt == "input_output":
            key = cfg.input_key
            value = text = _fill(cfg.input_template, _string(row, key))
        else:
            raise DataError(f"unknown prompt format '{fmt}' (expected prompt or input_output)")
    except _Skip as skip:
        return skip.args[0]
    columns = {k: v for k, v in row.data.items() if k != key}
    return PromptText(text, _dumps(value), _dumps(columns))


def encode_prompt_rows(items: Sequence[tuple[int, str, str, str]], tokenizer: Any,
                       max_len: int) -> list[tuple[PromptExample | str, bool]]:
    """Encode ``(row_id, text, prompt json, columns json)`` items: ``(example or skip reason, False)``
    (a prompt is never truncated: one longer than ``max_len`` tokens is skipped)."""
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}")
    policy = TokenPolicy.of(tokenizer)
    out: list[tuple[PromptExample | str, bool]] = []
    for (rid, _, prompt, columns), ids in zip(items, policy.encode([t for _, t, _, _ in items])):
        ids = policy.prompt(ids)
        if not ids:
            out.append((EMPTY_PROMPT, False))
        elif len(ids) > max_len:
            out.append((TOO_LONG, False))
        else:
            out.append((PromptExample(rid, ids, prompt, columns), False))
    return out


def collate_prompts(examples: Sequence[PromptExample], pad_id: int = 0) -> dict:
    """A micro-batch of prompts: ``row_ids`` ``[P]``, ``prompt_ids`` (lists of ints), ``prompts``
    (strings or message lists) and ``columns`` (dicts), one per prompt. Generation pads them itself."""
    if not examples:
        raise ValueError("collate_prompts: empty batch")
    return {
        "row_ids": torch.tensor([e.row_id for e in examples], dtype=torch.long),
        "prompt_ids": [np.asarray(e.prompt_ids).tolist() for e in examples],
        "prompts": [json.loads(e.prompt) for e in examples],
        "columns": [json.loads(e.columns) for e in examples],
    }


PROMPTS = ExampleType(
    "prompt", PromptExample, ("prompt", "input_output"),
    "a prompt format (a 'prompt' column: text or conversation; or input_output)",
    encode_prompt_rows, collate_prompts, collate_prompts, format_prompt_row, detect_prompt_format,
)
"""Prompts with reward columns (the ``grpo`` kind's examples); packing does not apply to prompts."""


# ---------------------------------------------------------------- completions as training rows
def pack_groups(examples: Sequence[SFTExample], group_size: int) -> dict:
    """One packed row of completions in groups of ``group_size`` consecutive examples that share
    their prompt: each prompt is laid out (and computed) once, with its first completion; the
    group's other completions continue its position ids and attend to it (as ``pack_pref`` does
    for a pair's rejected response). ``logp_*`` are in sequence order, as the padded batch's."""
    if not examples or len(examples) % group_size:
        raise ValueError(f"pack_groups: {len(examples)} completions are not groups of {group_size}")
    row = _Row()
    targets: list = [None] * len(examples)
    prompt_at: list[int] = []
    for g in range(0, len(examples), group_size):  # prompt + first completion of every group
        e = examples[g]
        start = row.add([e.prompt_ids, e.response_ids], 0)
        prompt_at.append(start)
        targets[g] = _targets(start, len(e.prompt_ids), e.response_ids, g)
    for g in range(0, len(examples), group_size):  # the others, attending to their prompt
        at, p = prompt_at[g // group_size], len(examples[g].prompt_ids)
        for s in range(g + 1, g + group_size):
            e = examples[s]
            start = row.add([e.response_ids], p, prefix=(at, at + p))
            targets[s] = _targets(start - p, p, e.response_ids, s, first_pos=at + p - 1)
    row.targets = targets
    return row.finish([e.row_id for e in examples])

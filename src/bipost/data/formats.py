"""Turning a raw row into text parts: (prompt, response) for SFT/KD, (prompt, chosen, rejected) for DPO,
(prompt, completion, label) for unpaired feedback (KTO).

Formats (``DataConfig.format``):

* ``input_output``: ``prompt = input_template.format(row[input_key])``, ``response = row[output_key]``.
* ``prompt_completion`` (TRL): ``prompt``/``completion`` strings used verbatim, or conversations
  (lists of ``{"role", "content"}``) rendered with the tokenizer's chat template.
* ``messages``: one conversation whose last turn is the assistant's; that turn is the response.
* ``preference``: ``prompt``/``chosen``/``rejected`` strings, or conversations: TRL's explicit
  prompt (a list of turns, with ``chosen``/``rejected`` holding the assistant turns, or the full
  conversations repeating the prompt turns) or full ``chosen``/``rejected`` conversations
  sharing their leading turns (the shared turns are the prompt; a string ``prompt`` column is
  used as the user turn when they share none). Without a ``prompt`` column, string pairs have
  an *implicit prompt* (HH-RLHF ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` dialogues): the
  longest common prefix of ``chosen`` and ``rejected``, cut back to just after the last
  ``"Assistant:"`` inside it (so the prompt ends with ``"\\n\\nAssistant:"``), or, without
  that marker, to just before its last whitespace; the responses are the remainders (they
  start with that whitespace, which byte-level BPEs fold into the next word's token).
* ``unpaired_preference`` (TRL's KTO data): ``prompt``/``completion`` as in ``prompt_completion``
  (strings or conversations) and a boolean ``label`` (``label_key``): true for a desirable
  completion, false for an undesirable one.
* ``auto``: picked from the first row's keys (see :func:`detect_format`).

Conversations are rendered so that the prompt text is
``apply_chat_template(prompt_turns, add_generation_prompt=True, tokenize=False)`` and the
response text is what the rendering of the whole conversation adds after it; a template
whose full rendering does not start with the prompt rendering is an error.

Bad rows: a *missing* key is a :class:`DataError` (the config names the wrong column; every
row would fail). A present but null, empty/whitespace-only or non-string value, a malformed
conversation, or a pair whose chosen and rejected responses are identical is a per-row
*skip* returned as its reason string (e.g. ``"empty 'output'"``, ``"null 'chosen'"``,
``"non-string 'prompt'"``), counted by the loader.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from bipost.config import DataConfig
from bipost.data.sources import DataError, Row

logger = logging.getLogger("bipost")

FORMATS = ("input_output", "prompt_completion", "messages", "preference", "unpaired_preference")

IMPLICIT_PROMPT_MARKER = "Assistant:"
"""Where an implicit (HH-RLHF style) prompt ends: just after the last such marker shared by both dialogues."""


@dataclass(frozen=True)
class SFTText:
    """A prompt and its response, as text."""

    prompt: str
    response: str


@dataclass(frozen=True)
class PrefText:
    """A prompt with a chosen and a rejected response, as text."""

    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class LabeledText:
    """A prompt and one completion, labeled desirable (True) or undesirable (False)."""

    prompt: str
    completion: str
    label: bool


class _Skip(Exception):
    """Internal: this row is skipped for the reason in ``args[0]``."""


def detect_format(keys: Iterable[str], cfg: DataConfig, accepted: Iterable[str] = FORMATS) -> Optional[str]:
    """The format a row with ``keys`` looks like, preferring one of ``accepted``.

    Checked in this order: ``messages_key`` → messages; ``prompt_key`` + ``completion_key`` +
    ``label_key`` → unpaired_preference; ``prompt_key`` + ``completion_key`` →
    prompt_completion; ``chosen_key`` + ``rejected_key`` → preference; ``input_key`` +
    ``output_key`` → input_output. The first match in ``accepted`` wins; otherwise the
    first match (which :func:`resolve_format` then rejects); ``None`` when nothing matches.
    """
    keys = set(keys)
    matches = []
    if cfg.messages_key in keys:
        matches.append("messages")
    if cfg.prompt_key in keys and cfg.completion_key in keys and cfg.label_key in keys:
        matches.append("unpaired_preference")
    if cfg.prompt_key in keys and cfg.completion_key in keys:
        matches.append("prompt_completion")
    if cfg.chosen_key in keys and cfg.rejected_key in keys:
        matches.append("preference")
    if cfg.input_key in keys and cfg.output_key in keys:
        matches.append("input_output")
    preferred = [m for m in matches if m in set(accepted)]
    return (preferred or matches or [None])[0]


def resolve_format(cfg: DataConfig, first_row: Optional[Row], examples, name: str = "", who: str = "") -> str:
    """The concrete format for ``cfg.format`` and the example type ``examples`` (an
    ``ExampleType`` or its name, ``data.examples``); logs what ``auto`` picked.

    Raises :class:`DataError` when ``auto`` recognises nothing or the format does not produce that
    example type (the message names ``who`` needs it, e.g. "objective 'dpo'").
    """
    from bipost.data.examples import example_type

    etype = example_type(examples)
    accepted, who = etype.formats, who or f"{etype.name} examples"
    name = name or cfg.path
    fmt = cfg.format
    if fmt == "auto":
        if first_row is None:
            raise DataError(f"'{name}': no rows, so the format can't be detected")
        fmt = (etype.detect(first_row.data.keys(), cfg) if etype.detect else None) \
            or detect_format(first_row.data.keys(), cfg, accepted)
        if fmt is None:
            raise DataError(
                f"'{name}': can't detect the data format from the first row's keys "
                f"{sorted(first_row.data)}; expected '{cfg.messages_key}' (messages), "
                f"'{cfg.prompt_key}'+'{cfg.completion_key}' (prompt_completion; with '{cfg.label_key}': "
                f"unpaired_preference), "
                f"'{cfg.chosen_key}'+'{cfg.rejected_key}' (preference) or "
                f"'{cfg.input_key}'+'{cfg.output_key}' (input_output); set data.format and the *_key fields"
            )
        logger.info("data '%s': format auto-detected as '%s' (from keys %s)", name, fmt, sorted(first_row.data))
    elif fmt not in FORMATS and fmt not in accepted:  # a type may bring formats of its own
        raise DataError(f"unknown data format '{fmt}' (expected auto or one of {list(FORMATS)}, or for "
                        f"{who}: {list(accepted)})")
    if fmt not in accepted:
        raise DataError(f"'{name}': {who} needs {etype.needs}, but the data format is '{fmt}'")
    return fmt


def format_row(row: Row, fmt: str, cfg: DataConfig, tokenizer: Any = None) -> SFTText | PrefText | LabeledText | str:
    """Text parts of ``row`` in format ``fmt``, or the reason string when the row is skipped.

    ``tokenizer`` (its chat template) is only needed for conversations.
    Raises :class:`DataError` for a missing key or a chat template that can't be split.
    """
    try:
        if fmt == "input_output":
            return _input_output(row, cfg)
        if fmt == "prompt_completion":
            return _prompt_completion(row, cfg, tokenizer)
        if fmt == "messages":
            return _messages(row, cfg, tokenizer)
        if fmt == "unpaired_preference":
            text = _prompt_completion(row, cfg, tokenizer)
            return LabeledText(text.prompt, text.response, _label(row, cfg.label_key))
        if fmt == "preference":
            pair = _preference(row, cfg, tokenizer)
            if pair.chosen == pair.rejected:
                # No preference signal (a tie in the data): DPO would learn nothing from it.
                return f"identical '{cfg.chosen_key}' and '{cfg.rejected_key}'"
            return pair
    except _Skip as skip:
        return skip.args[0]
    raise DataError(f"unknown data format '{fmt}' (expected one of {list(FORMATS)})")


# --- values -------------------------------------------------------------------------


def _require(row: Row, key: str) -> Any:
    if key not in row.data:
        raise DataError(f"{row.where()}: missing key '{key}' (the row has keys {sorted(row.data)})")
    return row.data[key]


def _shape(row: Row, key: str, value: Any = ...) -> str:
    """``"str"`` or ``"conv"`` for a usable value; skips null/empty/other values."""
    value = _require(row, key) if value is ... else value
    if value is None:
        raise _Skip(f"null '{key}'")
    if isinstance(value, str):
        if not value.strip():
            raise _Skip(f"empty '{key}'")
        return "str"
    if isinstance(value, (list, tuple)):
        if not value:
            raise _Skip(f"empty '{key}'")
        return "conv"
    raise _Skip(f"non-string '{key}'")


def _label(row: Row, key: str) -> bool:
    value = _require(row, key)
    if value is None:
        raise _Skip(f"null '{key}'")
    if type(value).__name__ not in ("bool", "bool_"):  # Python's or numpy's bool, not 0/1 or "true"
        raise _Skip(f"non-boolean '{key}'")
    return bool(value)


def _string(row: Row, key: str) -> str:
    value = _require(row, key)
    if _shape(row, key, value) != "str":
        raise _Skip(f"non-string '{key}'")
    return value


def _turns(key: str, value: Any) -> list[dict]:
    """A validated conversation: a non-empty list of ``{"role": str, "content": str, ...}``."""
    if not isinstance(value, (list, tuple)) or not value:
        raise _Skip(f"empty '{key}'" if isinstance(value, (list, tuple)) else f"non-string '{key}'")
    turns = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise _Skip(f"malformed message in '{key}'")
        if m["content"] is None:
            raise _Skip(f"null content in '{key}'")
        if not isinstance(m["content"], str):
            raise _Skip(f"non-string content in '{key}'")
        turns.append(dict(m))
    return turns


def _same_turn(a: dict, b: dict) -> bool:
    return a["role"] == b["role"] and a["content"] == b["content"]


def _check_responses(key: str, turns: list[dict]) -> None:
    if not turns:
        raise _Skip(f"no response turn in '{key}'")
    if any(t["role"] != "assistant" for t in turns):
        raise _Skip(f"response turns of '{key}' are not all the assistant's")
    if not any(t["content"].strip() for t in turns):
        raise _Skip(f"empty '{key}'")


# --- chat template -------------------------------------------------------------------


def _render(row: Row, tokenizer: Any, turns: list[dict], generation_prompt: bool) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{row.where()}: conversational data needs a tokenizer with a chat template, "
            f"and this tokenizer has none"
        )
    try:
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=generation_prompt, tokenize=False)
    except Exception as e:  # a template's raise_exception(...) (e.g. roles must alternate) rejects this row
        raise _Skip(f"chat template error ({type(e).__name__}: {str(e)[:80]})") from e
    if not isinstance(text, str):
        raise DataError(f"{row.where()}: apply_chat_template(tokenize=False) returned {type(text).__name__}, not text")
    return text


def _split_rendered(row: Row, tokenizer: Any, prompt_turns: list[dict], response_turns: list[dict],
                    key: str) -> tuple[str, str]:
    """(prompt text, response text) of a conversation, cut at the prompt's rendering."""
    prompt = _render(row, tokenizer, prompt_turns, generation_prompt=True)
    full = _render(row, tokenizer, prompt_turns + response_turns, generation_prompt=False)
    if not full.startswith(prompt):
        raise DataError(
            f"{row.where()}, field '{key}': the chat template's rendering of the whole conversation "
            f"does not start with its rendering of the prompt turns (add_generation_prompt=True), "
            f"so the response can't be separated: prompt={prompt[-60:]!r}, full={full[:len(prompt) + 20][-80:]!r}"
        )
    response = full[len(prompt):]
    if not response.strip():
        raise _Skip(f"empty '{key}'")
    return prompt, response


# --- formats -------------------------------------------------------------------------


def _input_output(row: Row, cfg: DataConfig) -> SFTText:
    inp = _string(row, cfg.input_key)
    out = _string(row, cfg.output_key)
    try:
        prompt = cfg.input_template.format(inp)
    except (IndexError, KeyError, ValueError) as e:
        raise DataError(
            f"data.input_template {cfg.input_template!r} can't be filled with str.format "
            f"(use '{{}}' for the input and '{{{{'/'}}}}' for literal braces): {e}"
        ) from e
    return SFTText(prompt, out)


def _prompt_completion(row: Row, cfg: DataConfig, tokenizer: Any) -> SFTText:
    pk, ck = cfg.prompt_key, cfg.completion_key
    p_shape, c_shape = _shape(row, pk), _shape(row, ck)
    if p_shape != c_shape:
        raise _Skip(f"mixed string/conversation '{pk}' and '{ck}'")
    if p_shape == "str":
        return SFTText(row.data[pk], row.data[ck])
    prompt_turns, completion_turns = _turns(pk, row.data[pk]), _turns(ck, row.data[ck])
    _check_responses(ck, completion_turns)
    return SFTText(*_split_rendered(row, tokenizer, prompt_turns, completion_turns, ck))


def _messages(row: Row, cfg: DataConfig, tokenizer: Any) -> SFTText:
    key = cfg.messages_key
    value = _require(row, key)
    if _shape(row, key, value) != "conv":
        raise _Skip(f"non-conversation '{key}'")
    turns = _turns(key, value)
    if turns[-1]["role"] != "assistant":
        raise _Skip(f"last turn of '{key}' is not the assistant's")
    _check_responses(key, turns[-1:])
    return SFTText(*_split_rendered(row, tokenizer, turns[:-1], turns[-1:], key))


def _preference(row: Row, cfg: DataConfig, tokenizer: Any) -> PrefText:
    pk, ck, rk = cfg.prompt_key, cfg.chosen_key, cfg.rejected_key
    c_shape, r_shape = _shape(row, ck), _shape(row, rk)
    if c_shape != r_shape:
        raise _Skip(f"mixed string/conversation '{ck}' and '{rk}'")
    has_prompt = pk in row.data
    if c_shape == "str":
        if has_prompt:
            return PrefText(_string(row, pk), row.data[ck], row.data[rk])
        return _implicit_prompt(row.data[ck], row.data[rk], ck, rk)
    return _preference_turns(row, cfg, tokenizer, has_prompt)


def _implicit_prompt(chosen: str, rejected: str, ck: str, rk: str) -> PrefText:
    """Split two dialogues into their shared prompt and the two responses (see module doc)."""
    prefix = os.path.commonprefix([chosen, rejected])
    cut = prefix.rfind(IMPLICIT_PROMPT_MARKER)
    if cut >= 0:
        cut += len(IMPLICIT_PROMPT_MARKER)
    else:
        # No marker: cut before the last whitespace, so no word is split between prompt and response.
        cut = max((i for i, ch in enumerate(prefix) if ch.isspace()), default=-1)
    if cut <= 0 or not prefix[:cut].strip():
        raise _Skip(f"no common prompt in '{ck}' and '{rk}'")
    prompt, c, r = chosen[:cut], chosen[cut:], rejected[cut:]
    if not c.strip():
        raise _Skip(f"empty '{ck}' after the implicit prompt")
    if not r.strip():
        raise _Skip(f"empty '{rk}' after the implicit prompt")
    return PrefText(prompt, c, r)


def _preference_turns(row: Row, cfg: DataConfig, tokenizer: Any, has_prompt: bool) -> PrefText:
    pk, ck, rk = cfg.prompt_key, cfg.chosen_key, cfg.rejected_key
    chosen, rejected = _turns(ck, row.data[ck]), _turns(rk, row.data[rk])
    prompt_value = row.data.get(pk)
    if has_prompt and isinstance(prompt_value, (list, tuple)):
        # TRL explicit prompt: chosen/rejected hold the assistant turns, or repeat the prompt turns.
        prompt_turns = _turns(pk, prompt_value)
        n = len(prompt_turns)
        for turns in (chosen, rejected):
            if len(turns) > n and all(_same_turn(a, b) for a, b in zip(turns, prompt_turns)):
                del turns[:n]
    else:
        # Full conversations: the shared leading turns, ending before an assistant turn, are the prompt.
        k = 0
        while k < min(len(chosen), len(rejected)) and _same_turn(chosen[k], rejected[k]):
            k += 1
        while k > 0 and chosen[k - 1]["role"] == "assistant":
            k -= 1
        prompt_turns = chosen[:k]
        chosen, rejected = chosen[k:], rejected[k:]
        if not prompt_turns:
            if not has_prompt:
                raise _Skip(f"no shared prompt turns in '{ck}' and '{rk}'")
            # e.g. a string prompt with assistant-only chosen/rejected turns: the prompt is the user turn.
            prompt_turns = [{"role": "user", "content": _string(row, pk)}]
    _check_responses(ck, chosen)
    _check_responses(rk, rejected)
    prompt, chosen_text = _split_rendered(row, tokenizer, prompt_turns, chosen, ck)
    _, rejected_text = _split_rendered(row, tokenizer, prompt_turns, rejected, rk)
    return PrefText(prompt, chosen_text, rejected_text)

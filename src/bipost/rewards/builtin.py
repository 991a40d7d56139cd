"""Small built-in reward functions (TRL's signature; see ``base.py``).

Options come from a :class:`~bipost.rewards.RewardSpec`'s ``args`` as keyword arguments, e.g.
``{"function": "exact_match", "args": {"column": "answer"}}``.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from bipost.rewards.base import completion_text


def normalize_whitespace(text: str) -> str:
    """Runs of whitespace become one space; leading and trailing whitespace is dropped."""
    return " ".join(text.split())


def exact_match(prompts: Sequence[Any], completions: Sequence[Any], *, column: str = "answer",
                **columns: Sequence[Any]) -> list[float | None]:
    """1.0 where the completion equals the row's ``column`` value after whitespace normalization,
    else 0.0; ``None`` (not applicable) where that value is ``None``. A row without the column is
    an error naming it and the columns there are."""
    if column not in columns:
        raise KeyError(f"exact_match needs the data column {column!r}; the rows have "
                       f"{', '.join(sorted(columns)) or 'no extra columns'}")
    out: list[float | None] = []
    for completion, target in zip(completions, columns[column]):
        if target is None:
            out.append(None)
            continue
        same = normalize_whitespace(completion_text(completion)) == normalize_whitespace(str(target))
        out.append(1.0 if same else 0.0)
    return out


def regex_match(prompts: Sequence[Any], completions: Sequence[Any], *, pattern: str, mode: str = "fullmatch",
                dotall: bool = True, **columns: Sequence[Any]) -> list[float]:
    """A format reward: 1.0 where the completion matches ``pattern``, else 0.0.

    ``mode``: ``fullmatch`` (the whole completion, the usual format check such as
    ``<think>.*?</think>\\s*<answer>.*?</answer>``) or ``search`` (anywhere). ``dotall``: ``.``
    also matches newlines (as in TRL's format rewards)."""
    if mode not in ("fullmatch", "search"):
        raise ValueError(f"regex mode must be 'fullmatch' or 'search', got {mode!r}")
    compiled = re.compile(pattern, re.DOTALL if dotall else 0)
    match = compiled.fullmatch if mode == "fullmatch" else compiled.search
    return [1.0 if match(completion_text(c)) else 0.0 for c in completions]

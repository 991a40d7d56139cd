"""Math answer checking with Hugging Face's ``math-verify`` (``pip install 'bipost[math]'``).

The gold answer (a data column) and the completion are both parsed by ``math_verify.parse``
(LaTeX, ``\\boxed{}``, plain expressions) and compared symbolically by ``math_verify.verify``
(so ``\\frac{1}{2}``, ``0.5`` and ``\\boxed{1/2}`` agree).
"""

from __future__ import annotations

from typing import Any, Sequence

from bipost.rewards.base import completion_text


def _math_verify():
    try:
        import math_verify
    except ImportError:
        raise ImportError("the 'math' reward needs the math-verify package: pip install 'bipost[math]'") from None
    return math_verify


def math_answer(prompts: Sequence[Any], completions: Sequence[Any], *, column: str = "answer",
                timeout_seconds: int | None = 5, **columns: Sequence[Any]) -> list[float | None]:
    """1.0 where the completion's answer equals the row's gold answer in ``column``, else 0.0.

    ``None`` (not applicable) where the gold answer is missing or cannot be parsed — the row cannot
    be scored, which is not the completion's fault. ``timeout_seconds`` bounds each parse/verify
    (math-verify uses ``SIGALRM``, so only in the main thread; ``None`` disables it)."""
    mv = _math_verify()
    if column not in columns:
        raise KeyError(f"the math reward needs the data column {column!r}; the rows have "
                       f"{', '.join(sorted(columns)) or 'no extra columns'}")
    out: list[float | None] = []
    for completion, gold in zip(completions, columns[column]):
        gold_parsed = mv.parse(str(gold), parsing_timeout=timeout_seconds) if gold is not None else []
        if not gold_parsed:
            out.append(None)
            continue
        answer = mv.parse(completion_text(completion), parsing_timeout=timeout_seconds)
        out.append(float(mv.verify(gold_parsed, answer, timeout_seconds=timeout_seconds)))
    return out

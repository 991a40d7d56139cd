"""Scores of one generation against a reference, and of a judged pair: pure functions of text and numbers.

* **exact match**: 1.0 when the generation equals the reference after whitespace normalization
  (runs of whitespace become one space, ends stripped; the ``exact_match`` reward's rule), else 0.0.
  Case and punctuation count.
* **token F1**: SQuAD's F1 over whitespace tokens, without its English-specific normalization: with
  ``common`` the size of the multiset intersection of the two token lists, precision =
  ``common / len(generation)``, recall = ``common / len(reference)``, F1 their harmonic mean
  (0 when nothing is shared; 1 when both are empty).
* **win**: 1.0 when the judge scores the policy's response above the chosen one, 0.5 on a tie
  (AlpacaEval's convention), 0.0 below; the win rate is the mean over prompts.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from bipost.rewards.builtin import normalize_whitespace


def exact_match(generation: str, reference: str) -> float:
    """1.0 when equal after whitespace normalization, else 0.0."""
    return 1.0 if normalize_whitespace(generation) == normalize_whitespace(reference) else 0.0


def token_f1(generation: str, reference: str) -> float:
    """F1 of the whitespace tokens shared by ``generation`` and ``reference`` (as multisets)."""
    gen, ref = generation.split(), reference.split()
    if not gen and not ref:
        return 1.0
    common = sum((Counter(gen) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(gen), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def wins(policy_scores: Sequence[float], chosen_scores: Sequence[float]) -> list[float]:
    """Per prompt: 1.0 when the policy's score is higher than the chosen response's, 0.5 when equal,
    else 0.0."""
    if len(policy_scores) != len(chosen_scores):
        raise ValueError(f"{len(policy_scores)} policy scores for {len(chosen_scores)} chosen scores")
    return [1.0 if p > c else 0.5 if p == c else 0.0 for p, c in zip(policy_scores, chosen_scores)]


def mean(values: Sequence[float]) -> float:
    """The mean (NaN for no values: a metric of nothing is not 0)."""
    return sum(values) / len(values) if values else float("nan")

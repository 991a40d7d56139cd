"""Synthetic tasks with a verifiable notion of right and better, for the offline demo and tests.

The task: an instruction ("reverse" or "copy") and a short sequence of letters; the right answer
is the reversed or copied sequence. Preference pairs prefer the right answer over a corrupted one
(two letters swapped, a letter dropped, or the other task's answer), so "better" is checkable.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

LETTERS = "abcdefghij"


def make_prompt(task: str, seq: list[str]) -> str:
    return f"{task}: {' '.join(seq)}"


def answer(task: str, seq: list[str]) -> str:
    return " ".join(reversed(seq) if task == "reverse" else seq)


def corrupt(task: str, seq: list[str], rng: random.Random) -> str:
    right = answer(task, seq).split()
    kind = rng.choice(["swap", "drop", "other"])
    if kind == "other" and len(set(seq)) > 1:
        wrong = answer("copy" if task == "reverse" else "reverse", seq).split()
        if wrong != right:
            return " ".join(wrong)
    if kind == "drop" and len(right) > 2:
        i = rng.randrange(len(right))
        return " ".join(right[:i] + right[i + 1:])
    for _ in range(10):
        i, j = rng.sample(range(len(right)), 2)
        wrong = list(right)
        wrong[i], wrong[j] = wrong[j], wrong[i]
        if wrong != right:
            return " ".join(wrong)
    return " ".join(right[:-1])


def sample_seq(rng: random.Random, min_len: int = 3, max_len: int = 5) -> list[str]:
    return [rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len))]


def sft_rows(n: int, task: str = "reverse", seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        seq = sample_seq(rng)
        rows.append({"input": make_prompt(task, seq), "output": answer(task, seq)})
    return rows


def preference_rows(n: int, task: str = "reverse", seed: int = 1, chosen_task: str | None = None) -> list[dict]:
    """Pairs on ``task`` prompts. ``chosen_task`` (default: the task itself) names whose answer is
    preferred, so the preference can be made to *conflict* with an SFT task on the same prompts."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        seq = sample_seq(rng)
        good = answer(chosen_task or task, seq)
        bad = corrupt(chosen_task or task, seq, rng)
        rows.append({"prompt": f"User: {make_prompt(task, seq)}\nAssistant: ", "chosen": good, "rejected": bad})
    return rows


def corpus(rows_sets: list[list[dict]]) -> list[str]:
    """Texts to train the demo tokenizer on."""
    texts = []
    for rows in rows_sets:
        for r in rows:
            texts.extend(str(v) for v in r.values())
    texts += [f"User: {t}: a\nAssistant: a" for t in ("reverse", "copy")]
    return texts


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path

"""Shared test fixtures: a tiny tokenizer trained offline, and small file writers.

Keep fixtures general-purpose; module-specific helpers belong in the test module.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import pytest

# Tests never reach the network: hub lookups fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Token stores (data.cache_dir's default) go to a fresh folder of this test session, never to the
# user's ~/.cache; subprocesses (CLI, torchrun) inherit it. Tests that check building vs reusing
# a store pass their own data.cache_dir.
_CACHE_ROOT = tempfile.mkdtemp(prefix="bipost-test-cache-")
os.environ["BIPOST_CACHE"] = _CACHE_ROOT
atexit.register(shutil.rmtree, _CACHE_ROOT, ignore_errors=True)
# The tiny test models gain nothing from a second thread, and on a shared 2-core machine a
# descheduled OpenMP thread stalls every parallel region (steps got 10-30x slower under load).
# Subprocesses (CLI, torchrun) inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def _tiny_texts() -> list[str]:
    words = ["hello", "world", "the", "answer", "is", "what", "cat", "dog", "sat", "on", "mat",
             "Human", "Assistant", "User", "question", "yes", "no", "please", "thanks", "good"]
    texts = []
    for i in range(300):
        a, b, c = words[i % len(words)], words[(i * 7) % len(words)], words[(i * 13) % len(words)]
        texts.append(f"User: {a} {b} {i}?\nAssistant: {c} {a} {i * 7}.")
        texts.append(f"\n\nHuman: {b} {c}\n\nAssistant: {a} {b} {c}")
    return texts


@pytest.fixture(scope="session")
def tiny_texts() -> list[str]:
    """The few hundred short texts the tiny tokenizer is trained on."""
    return _tiny_texts()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_texts):
    """A byte-level BPE tokenizer (bipost.tiny) that prepends <bos> and has a ChatML-like
    chat template ending every turn with <eos>. Session-scoped: do not mutate it (deepcopy)."""
    from bipost.tiny import build_tokenizer

    return build_tokenizer(tiny_texts, vocab_size=512)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    """``tiny_tokenizer`` saved with ``save_pretrained`` (loadable by ``AutoTokenizer``)."""
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def write_jsonl(tmp_path) -> Callable[..., Path]:
    """``write_jsonl(rows, name="train.jsonl")`` writes dicts as JSON lines under ``tmp_path``."""

    def write(rows: Iterable[dict[str, Any]], name: str = "train.jsonl") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory):
    """``two_ranks(name)``: both ranks' records of a 2-rank scenario of ``tests/two_ranks.py`` (all of
    them run in one torchrun launch, the first time any is asked for)."""
    from two_ranks import TwoRanks

    return TwoRanks(tmp_path_factory.mktemp("two-ranks"))

"""Benchmarks through lm-evaluation-harness (``pip install 'bipost[eval]'``) on a model in memory.

The model being trained (or one loaded by ``bipost eval``) is handed to lm-eval's ``HFLM`` as an
initialized model, with the run's tokenizer; tasks are named as lm-eval names them (``mmlu``,
``arc_easy``, ``hellaswag``, ``gsm8k``, ...) or given as task YAML files (local data runs offline).

**Every rank runs every benchmark, on the same documents, in the same order.** lm-eval's own data
parallelism splits documents over ranks and pads the *requests* to equal counts, but its batching
(grouping by context, by generation arguments) does not guarantee equal numbers of *forwards* per
rank, and on FSDP2 / ZeRO-3 each forward is a collective: an unequal count hangs. Running the whole
benchmark on every rank keeps every collective matched on every engine (and works for a replicated
model too); the price is that benchmark time does not shrink with more ranks. "Rank 0 alone" is
not an option: a sharded model cannot run a forward on one rank. Rank 0's scores are shared with
every rank (and written).

lm-eval seeds Python's, NumPy's and torch's global generators; they are restored afterwards, so a
run with benchmarks trains exactly as one without. The model's train/eval flags are restored too.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from bipost.config import BenchmarkConfig


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise ImportError("eval.benchmarks needs lm-evaluation-harness: pip install 'bipost[eval]'") from None
    return lm_eval


def is_task_file(task: str) -> bool:
    """A task given as a YAML file rather than a registered name."""
    return task.endswith((".yaml", ".yml")) or Path(task).is_file()


@functools.lru_cache(maxsize=4)
def task_manager(include_defaults: bool):
    """lm-eval's task index, built once per process (indexing the built-in tasks takes seconds;
    task YAML files given by path need none of them)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=include_defaults)


@contextlib.contextmanager
def _as_found(model) -> Iterator[None]:
    """Restore what evaluating the model changes around it: every module's train/eval flag (HFLM
    switches the model to eval mode) and the global RNG states (lm-eval seeds them)."""
    from bipost.train.checkpoint import rng_state, set_rng_state

    flags = [(m, m.training) for m in model.modules()]
    rng = rng_state()
    try:
        yield
    finally:
        for m, was_training in flags:
            m.training = was_training
        set_rng_state(rng)


@contextlib.contextmanager
def _without_retying(model) -> Iterator[None]:
    """HFLM re-ties the input and output embeddings of the model it is given; a model being trained
    is already tied, and re-assigning a sharded model's parameters would unregister them."""
    model.tie_weights = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del model.tie_weights


def scores_of(results: dict) -> dict[str, float]:
    """``bench/<task>/<metric>`` for every top-level task or group of an lm-eval result (a group's
    own aggregate, not its subtasks'); a metric under a filter other than ``none`` is
    ``bench/<task>/<metric>/<filter>``. Standard errors are left out (they are in the results file)."""
    sub = {t for children in (results.get("group_subtasks") or {}).values() for t in children}
    out: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        if task in sub:
            continue
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, numbers.Real) or isinstance(value, bool):
                continue
            metric, filt = key.split(",", 1)
            name = f"bench/{task}/{metric}" + ("" if filt == "none" else f"/{filt}")
            out[name] = float(value) if math.isfinite(float(value)) else math.nan
    return out


def run_benchmarks(model, tokenizer, benchmarks: Sequence[BenchmarkConfig], comm, *, batch_size: int = 8,
                   chat_template: bool = False) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Evaluate ``model`` on every benchmark (see the module docstring); every rank calls it.

    Returns ``(scores, results)``: the ``bench/...`` scores (:func:`scores_of`) and, per benchmark,
    lm-eval's results (its ``results``, ``groups``, ``n-shot``, ``n-samples`` and ``versions``),
    both rank 0's, on every rank.
    """
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    from bipost.generation import generation_model

    inner = generation_model(model)
    manager = task_manager(include_defaults=not all(is_task_file(b.task) for b in benchmarks))
    scores: dict[str, float] = {}
    kept: list[dict[str, Any]] = []
    with _as_found(inner), torch.no_grad():
        with _without_retying(inner):
            lm = HFLM(pretrained=inner, tokenizer=tokenizer, batch_size=batch_size)
        for b in benchmarks:
            task = str(Path(b.task).resolve()) if is_task_file(b.task) else b.task
            limit = int(b.limit) if b.limit is not None and b.limit >= 1 else b.limit
            res = lm_eval.simple_evaluate(
                model=lm, tasks=[task], num_fewshot=b.num_fewshot, limit=limit, task_manager=manager,
                bootstrap_iters=0, log_samples=False, apply_chat_template=chat_template,
                fewshot_as_multiturn=chat_template)
            if res is not None:  # rank 0 (lm-eval returns results there only)
                scores.update(scores_of(res))
                kept.append({"task": b.task, "num_fewshot": b.num_fewshot, "limit": b.limit,
                             **{k: res.get(k) for k in ("results", "groups", "group_subtasks", "n-shot",
                                                        "n-samples", "versions")}})
    scores, kept = comm.gather_objects((scores, kept))[0]
    return scores, kept

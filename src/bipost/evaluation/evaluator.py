"""One evaluation of one model: generation metrics per objective and benchmarks, with their files.

Shared by the training hook (:mod:`bipost.evaluation.hook`, the model being trained) and
``bipost eval`` (a saved run or model). An evaluation writes into its own folder::

    <objective>.samples.jsonl   per held-out prompt: prompt, generation, reference, scores
    benchmarks.json             lm-eval's results per benchmark
    metrics.json                every score of the evaluation

and returns the scores (``gen/<objective>/<metric>``, ``bench/<task>/<metric>``), the same on every
rank. Only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from bipost.config import EvalConfig
from bipost.evaluation.benchmarks import run_benchmarks
from bipost.data.examples import ExampleType
from bipost.evaluation.generations import Judge, evaluate_generations

log = logging.getLogger("bipost")


@dataclass
class EvalTarget:
    """An objective whose generations are scored: its held-out examples and their example type."""

    name: str
    examples: Sequence
    example_type: ExampleType
    """Its ``reference`` field is what generations are scored against."""


def eval_targets(cfg: EvalConfig, objectives: dict[str, tuple[Sequence, ExampleType]]) -> list[EvalTarget]:
    """The objectives ``cfg`` scores: ``cfg.objectives`` (each must have held-out rows of a type
    generations can be scored on), else every objective that has such rows."""
    named = list(cfg.objectives)
    targets = []
    for name, (examples, etype) in objectives.items():
        if named and name not in named:
            continue
        usable = bool(examples) and etype.reference is not None
        if named and not usable:
            why = "no held-out rows (set its data.eval_fraction or data.eval_split)" if not examples else \
                f"{etype.name!r} examples, which have no reference response"
            raise ValueError(f"eval.objectives names {name!r}, which has {why}")
        if usable:
            targets.append(EvalTarget(name, examples, etype))
    return targets


class Evaluator:
    """Evaluates a model as ``cfg`` says; see the module docstring.

    Args:
        cfg: the ``eval`` config.
        tokenizer: the model's tokenizer (decodes prompts and generations; lm-eval tokenizes with it).
        comm: collectives (an :class:`~bipost.engine.Engine` or :class:`~bipost.engine.LocalComm`).
        objectives: name -> (held-out examples, example type) of the run's objectives.
        log_table: ``(key, rows, step)`` -> None, to show samples as a table in trackers that have them.
    """

    def __init__(self, cfg: EvalConfig, tokenizer, comm, objectives: dict[str, tuple[Sequence, ExampleType]],
                 log_table: Callable[[str, list[dict], int], None] | None = None):
        self.cfg, self.tokenizer, self.comm = cfg, tokenizer, comm
        self.targets = eval_targets(cfg, objectives) if cfg.generate else []
        if cfg.generate and not self.targets:
            log.warning("eval.generate: no objective has held-out prompt/response or preference rows; "
                        "no generation metrics will be measured")
        self.log_table = log_table
        # Fail now, not at the first evaluation after hours of training: a missing lm-eval, a
        # judge that does not load.
        if cfg.benchmarks:
            from bipost.evaluation.benchmarks import _lm_eval

            _lm_eval()
        self.judge = None
        if cfg.judge.enabled and any(t.example_type.preferred for t in self.targets):
            self.judge = Judge(cfg.judge, getattr(comm, "device", "cpu"))  # on every rank

    def run(self, model, folder: Path, *, generations: bool = True, benchmarks: bool = True,
            step: int | None = None) -> dict[str, float]:
        """Evaluate ``model`` (every rank calls it); write the evaluation's files into ``folder``.
        ``step``: the training step of the model, when known."""
        scores: dict[str, float] = {}
        if self.comm.is_main:
            folder.mkdir(parents=True, exist_ok=True)
        if generations:
            for t in self.targets:
                start = time.perf_counter()
                res = evaluate_generations(model, self.tokenizer, t.name, t.examples, t.example_type, self.cfg,
                                           self.comm, self.judge if t.example_type.preferred else None)
                scores.update(res.metrics)
                if self.comm.is_main and self.cfg.samples:
                    _write_jsonl(folder / f"{t.name}.samples.jsonl", res.samples)
                    if self.log_table is not None and step is not None:
                        self.log_table(f"samples/{t.name}", res.samples, step)
                log.info("[eval] %s: %d generations in %.1fs", t.name, len(res.samples), time.perf_counter() - start)
        if benchmarks and self.cfg.benchmarks:
            bench, results = run_benchmarks(model, self.tokenizer, self.cfg.benchmarks, self.comm,
                                            batch_size=self.cfg.benchmark_batch_size,
                                            chat_template=self.cfg.chat_template)
            scores.update(bench)
            if self.comm.is_main:
                (folder / "benchmarks.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        if self.comm.is_main:
            head = {} if step is None else {"step": step}
            (folder / "metrics.json").write_text(json.dumps({**head, **scores}, indent=2) + "\n")
        return scores


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")

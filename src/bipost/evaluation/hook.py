"""The ``eval`` section during training: a step hook that evaluates the model being trained at the
loop's held-out evaluations.

At an evaluation at step ``s`` (``train.eval_steps``, and always the run's last one) it scores
generations when ``s`` is a multiple of ``eval.generation_steps`` (or it is the last evaluation) and
runs the benchmarks when ``s`` is a multiple of ``eval.benchmark_steps`` (or the last). Scores join
the evaluation's record in metrics.jsonl and every tracker; files go to
``<output_dir>/eval/step-NNNNNNNN/`` (see :mod:`bipost.evaluation.evaluator`).
"""

from __future__ import annotations

from bipost.config import EvalConfig
from bipost.evaluation.evaluator import Evaluator
from bipost.train.hooks import HookContext, StepHook


def eval_folder(output_dir, step: int):
    """Where the evaluation at ``step`` writes its files."""
    from pathlib import Path

    return Path(output_dir) / "eval" / f"step-{step:08d}"


class EvalHook(StepHook):
    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg

    def bind(self, ctx: HookContext) -> None:
        super().bind(ctx)
        held_out = {n: (v.eval, v.examples) for n, v in ctx.objectives.items()}
        self.evaluator = Evaluator(self.cfg, ctx.tokenizer, ctx.comm, held_out, log_table=ctx.log_table)

    @staticmethod
    def _due(every: int, step: int, final: bool) -> bool:
        return final or (every > 0 and step % every == 0)

    def evaluate(self, step: int, final: bool) -> dict:
        generations = self.cfg.generate and self._due(self.cfg.generation_steps, step, final)
        benchmarks = bool(self.cfg.benchmarks) and self._due(self.cfg.benchmark_steps, step, final)
        if not (generations or benchmarks):
            return {}
        return self.evaluator.run(self.ctx.model, eval_folder(self.ctx.output_dir, step), generations=generations,
                                  benchmarks=benchmarks, step=step)

"""Evaluation beyond held-out losses: generation metrics per objective (exact match, token F1, win
rate against the chosen response) and benchmarks through lm-evaluation-harness, during training
(:class:`EvalHook`, the ``eval`` config section) and on a saved run or model (``bipost eval``)."""

from bipost.engine import LocalComm
from bipost.evaluation.evaluator import EvalTarget, Evaluator, eval_targets
from bipost.evaluation.generations import Judge, ObjectiveGenerations, evaluate_generations
from bipost.evaluation.hook import EvalHook, eval_folder
from bipost.evaluation.scores import exact_match, token_f1, wins

__all__ = ["EvalHook", "EvalTarget", "Evaluator", "Judge", "LocalComm", "ObjectiveGenerations", "eval_folder",
           "eval_targets", "evaluate_generations", "exact_match", "token_f1", "wins"]

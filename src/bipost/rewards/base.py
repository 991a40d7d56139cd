"""Reward functions named by import path, weighted and combined into one reward per completion.

A reward function has TRL's signature, so users reuse theirs unchanged::

    def f(prompts, completions, **columns) -> list[float | None]

It is called with keyword arguments only: ``prompts`` (one per completion, repeated within a
group), ``completions`` and every extra data column of the prompts' rows (e.g. ``answer``), one
value per completion. Completions are strings, or — when the prompts are conversations (lists of
``{"role", "content"}`` messages) — TRL's conversational form ``[{"role": "assistant", "content":
text}]``. With ``completion_ids`` given to :meth:`RewardFunctions.__call__`, functions also get
``completion_ids`` (token ids), as in TRL.

``None`` means "not applicable to this completion" (TRL's convention, e.g. a math checker on a
prompt without a gold answer): that function is left out of the completion's weighted sum
(``total = sum over applicable f of weight_f * r_f``) and of its own metrics. A completion for which
*every* function returns ``None`` has no reward at all: an error, not a silent 0.

Anything else that is not a finite number — an exception, a wrong length, NaN/inf, a string — is a
:class:`RewardError` naming the function (and the completion's index), never a silent 0.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

BUILTINS: dict[str, str] = {
    "exact_match": "bipost.rewards.builtin:exact_match",
    "regex": "bipost.rewards.builtin:regex_match",
    "math": "bipost.rewards.math_answer:math_answer",
    "reward_model": "bipost.rewards.model:RewardModel",
}
"""Built-in rewards by short name (see their docstrings for their ``args``)."""

RESERVED = ("prompts", "completions", "completion_ids")
"""Keyword arguments every reward function gets; data columns may not use these names."""


class RewardError(ValueError):
    """A reward function could not be loaded, failed, or returned something that is not a reward."""


@dataclass
class RewardSpec:
    """One reward function of an objective, as the config names it."""

    function: str
    """A built-in name (``exact_match``, ``regex``, ``math``, ``reward_model``) or an import path
    ``module:attribute`` (``attribute`` may be dotted). A class is instantiated with ``args`` and
    the instance is the reward function; a function gets ``args`` bound as keyword arguments."""
    weight: float = 1.0
    """Weight in the combined reward (0 keeps the function for its metrics only)."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword options of the function (e.g. ``{"column": "answer"}`` for ``exact_match``)."""
    name: str | None = None
    """Name in metrics and errors; default: the built-in name, or the attribute's name."""

    def __post_init__(self) -> None:
        if not isinstance(self.function, str) or not self.function:
            raise RewardError(f"a reward function is named by a string, got {self.function!r}")
        if self.function not in BUILTINS and ":" not in self.function:
            raise RewardError(f"reward function {self.function!r} is neither a built-in "
                              f"({', '.join(BUILTINS)}) nor an import path 'module:function'")
        if isinstance(self.weight, bool) or not isinstance(self.weight, numbers.Real) \
                or not math.isfinite(self.weight):
            raise RewardError(f"reward function {self.function!r}: weight must be a finite number, got {self.weight!r}")
        if not isinstance(self.args, Mapping):
            raise RewardError(f"reward function {self.function!r}: args must be a mapping, got {self.args!r}")

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        if self.function in BUILTINS:
            return self.function
        return self.function.rsplit(":", 1)[1].rsplit(".", 1)[-1]


def _resolve(path: str, label: str) -> Any:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise RewardError(f"reward function {label!r}: expected 'module:function', got {path!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"reward function {label!r}: cannot import module {module_name!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"reward function {label!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def load_reward(spec: RewardSpec) -> Callable[..., Any]:
    """The callable a spec names, with its ``args`` applied (see :attr:`RewardSpec.function`)."""
    target = _resolve(BUILTINS.get(spec.function, spec.function), spec.display_name)
    args = dict(spec.args)
    if inspect.isclass(target):
        try:
            fn = target(**args)
        except Exception as e:
            raise RewardError(f"reward function {spec.display_name!r}: building {spec.function} with "
                              f"args {args} failed: {type(e).__name__}: {e}") from e
    elif callable(target):
        fn = functools.partial(target, **args) if args else target
    else:
        raise RewardError(f"reward function {spec.display_name!r}: {spec.function} is not callable")
    if not callable(fn):
        raise RewardError(f"reward function {spec.display_name!r}: an instance of {spec.function} is not callable")
    return fn


def is_conversational(prompt: Any) -> bool:
    """A prompt given as a list of ``{"role", "content"}`` messages (TRL's conversational form)."""
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) and "role" in m for m in prompt)


def completion_text(completion: Any) -> str:
    """A completion's text, from a string or TRL's conversational form (the last message's content)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion is a string or a list of messages, got {type(completion).__name__}")


# ---------------------------------------------------------------- combining
@dataclass
class RewardScores:
    """Rewards of a batch of completions."""

    total: torch.Tensor
    """``[N]`` float32: the weighted sum over the functions that apply to each completion."""
    per_function: torch.Tensor
    """``[N, F]`` float32: each function's reward, NaN where it returned ``None``."""
    names: list[str]
    """The ``F`` functions' names, in column order."""

    def summary(self) -> dict[str, float]:
        """``reward/mean``, ``reward/std`` and, per function, ``reward/<name>/mean`` and ``/std`` over
        the completions it applies to (NaN when it applies to none; std 0 for a single value)."""
        out = {"reward/mean": float(self.total.mean()), "reward/std": _std(self.total)}
        for j, name in enumerate(self.names):
            col = self.per_function[:, j]
            col = col[~torch.isnan(col)]
            out[f"reward/{name}/mean"] = float(col.mean()) if col.numel() else math.nan
            out[f"reward/{name}/std"] = _std(col) if col.numel() else math.nan
        return out


def _std(x: torch.Tensor) -> float:
    return float(x.std()) if x.numel() > 1 else 0.0


class RewardFunctions:
    """Several reward functions with weights: called on a batch, one combined reward per completion.

    ``functions`` are :class:`RewardSpec` s (loaded here, once: a reward model is built at this
    point) or plain callables (weight 1, named by ``__name__``)."""

    def __init__(self, functions: Sequence[RewardSpec | Callable[..., Any]]):
        if not functions:
            raise RewardError("at least one reward function is needed")
        self.names: list[str] = []
        self.weights: list[float] = []
        self.functions: list[Callable[..., Any]] = []
        for f in functions:
            if isinstance(f, RewardSpec):
                name, weight, fn = f.display_name, float(f.weight), load_reward(f)
            elif callable(f):
                name, weight, fn = getattr(f, "__name__", type(f).__name__), 1.0, f
            else:
                raise RewardError(f"expected a RewardSpec or a callable, got {f!r}")
            if name in self.names:
                raise RewardError(f"two reward functions are named {name!r}: give them distinct names")
            self.names.append(name)
            self.weights.append(weight)
            self.functions.append(fn)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str],
                 columns: Mapping[str, Sequence[Any]] | None = None,
                 completion_ids: Sequence[Sequence[int]] | None = None) -> RewardScores:
        """Score ``completions`` (strings; one per prompt entry) with every function.

        Args:
            prompts: ``[N]`` prompts (strings or conversations), repeated for each completion.
            completions: ``[N]`` completion texts (decoded, without special tokens).
            columns: extra data columns, each ``[N]``, passed to every function by name.
            completion_ids: optional ``[N]`` token ids, passed as ``completion_ids`` when given.
        """
        n = len(completions)
        if len(prompts) != n:
            raise RewardError(f"{len(prompts)} prompts for {n} completions: give one prompt per completion")
        columns = dict(columns or {})
        for key, values in columns.items():
            if key in RESERVED:
                raise RewardError(f"data column {key!r} clashes with a reward function argument ({', '.join(RESERVED)})")
            if len(values) != n:
                raise RewardError(f"data column {key!r} has {len(values)} values for {n} completions")
        if n and is_conversational(prompts[0]):
            comps: list[Any] = [[{"role": "assistant", "content": c}] for c in completions]
        else:
            comps = list(completions)
        kwargs: dict[str, Any] = {"prompts": list(prompts), "completions": comps, **columns}
        if completion_ids is not None:
            kwargs["completion_ids"] = completion_ids
        table = torch.full((n, len(self.functions)), math.nan, dtype=torch.float32)
        for j, (name, fn) in enumerate(zip(self.names, self.functions)):
            try:
                out = fn(**kwargs)
            except RewardError:
                raise
            except Exception as e:
                raise RewardError(f"reward function {name!r} raised {type(e).__name__}: {e}") from e
            for i, v in enumerate(_check_output(name, out, completions)):
                if v is not None:
                    table[i, j] = v
        applies = ~torch.isnan(table)
        missing = torch.nonzero(~applies.any(dim=1)).flatten().tolist()
        if missing:
            raise RewardError(f"completion {missing[0]} has no reward: every reward function ({', '.join(self.names)}) "
                              f"returned None for it ({len(missing)} such completions)")
        weights = torch.tensor(self.weights, dtype=torch.float32)
        total = torch.where(applies, table * weights, torch.zeros_like(table)).sum(dim=1)
        return RewardScores(total=total, per_function=table, names=list(self.names))


def _check_output(name: str, out: Any, completions: Sequence[str]) -> list[float | None]:
    """``out`` as a list of finite floats or ``None``, or a :class:`RewardError` naming ``name``."""
    n = len(completions)
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):  # a tensor or numpy array
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise RewardError(f"reward function {name!r} returned {type(out).__name__}, expected a list of {n} rewards")
    if len(out) != n:
        raise RewardError(f"reward function {name!r} returned {len(out)} rewards for {n} completions")
    values: list[float | None] = []
    for i, v in enumerate(out):
        if v is None:
            values.append(None)
            continue
        if not isinstance(v, numbers.Real):
            raise RewardError(f"reward function {name!r} returned a {type(v).__name__} ({v!r}) at index {i}, "
                              f"expected a number or None; completion {i}: {_preview(completions[i])}")
        f = float(v)
        if not math.isfinite(f):
            raise RewardError(f"reward function {name!r} returned {f} at index {i}; completion {i}: "
                              f"{_preview(completions[i])}")
        values.append(f)
    return values


def _preview(text: Any, limit: int = 60) -> str:
    s = str(text)
    return repr(s if len(s) <= limit else s[:limit] + "...")

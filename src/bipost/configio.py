"""YAML + ``a.b=c`` overrides -> typed, validated ``RunConfig``; and field help from docstrings."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from bipost import config as C
from bipost.config import ConfigError

__all__ = ["ConfigError", "apply_override", "canonical_objective", "describe", "from_dict", "load_config", "validate",
           "validate_eval"]


# ---------------------------------------------------------------- building from dicts

def _type_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls, {**vars(C), **vars(inspect.getmodule(cls))})


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        if tp is C.ObjectiveConfig:
            return objective_from_dict(value, where)
        return from_dict(tp, value, where)
    if origin is list:
        (item,) = args
        if isinstance(value, str):  # from an override: "a,b" or "[a, b]"
            parsed = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            value = parsed
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item, f"{where}.{i}") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            num = float(value) if isinstance(value, str) else value
            if tp is int:
                if float(num) != int(float(num)):
                    raise ValueError
                return int(float(num))
            return float(num)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass ``cls`` from a nested dict; unknown keys are errors (typos never pass silently)."""
    hints = _type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(
            f"unknown field(s) {sorted(unknown)} in {where or cls.__name__}; valid: {sorted(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # a dataclass that validates itself (e.g. a reward function's spec)
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def objective_from_dict(data: dict, where: str) -> C.ObjectiveConfig:
    """An objective's config as its kind's dataclass (``objectives.N.kind`` picks it).

    A field may be given under an alias its kind declares (``ObjectiveConfig.aliases``: an earlier
    name). A field of *another* kind (or an alias of one) is accepted only at a default value such a
    kind gives it (configs saved by earlier bipost versions list every kind's fields on every
    objective) and is dropped."""
    from bipost.kinds import get_kind, kinds  # the kind modules declare their configs

    kind = str(data.get("kind", C.ObjectiveConfig.kind))
    if kind not in kinds():
        raise ConfigError(f"{where}.kind must be one of {', '.join(kinds())}, not {kind!r}")
    cls = get_kind(kind).config_class
    data = _aliases_renamed(cls, data, where)
    own = {f.name for f in dataclasses.fields(cls)}
    foreign: dict[str, list[tuple[str, Any, Any]]] = {}  # key -> (kind, type, default) of each kind that has it
    for other in kinds().values():
        ocls = other.config_class
        hints = _type_hints(ocls)
        fields = {f.name: f for f in dataclasses.fields(ocls)}
        names = {**{n: n for n in fields}, **ocls.aliases}
        for key, name in names.items():
            if key not in own and name in fields:
                f = fields[name]
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
                foreign.setdefault(key, []).append((other.kind, hints[name], default))
    kept = {}
    for key, value in data.items():
        if key in own or key not in foreign:
            kept[key] = value  # unknown keys: from_dict names them
            continue
        if not any(_is_value(value, tp, default, f"{where}.{key}") for _, tp, default in foreign[key]):
            owners = ", ".join(sorted({k for k, _, _ in foreign[key]}))
            raise ConfigError(f"{where}.{key} is a field of {owners} objectives, not of {kind}")
    return from_dict(cls, kept, where)


def _is_value(value: Any, tp: Any, expected: Any, where: str) -> bool:
    try:
        return _coerce(value, tp, where) == expected
    except ConfigError:
        return False


def _aliases_renamed(cls, data: dict, where: str) -> dict:
    """``data`` with the aliases of config class ``cls`` renamed to their fields."""
    out = dict(data)
    for alias, name in getattr(cls, "aliases", {}).items():
        if alias in out:
            if name in out:
                raise ConfigError(f"{where}.{alias} is another name of {where}.{name}: give only one of them")
            out[name] = out.pop(alias)
    return out


def canonical_objective(data: dict, where: str = "objective") -> dict:
    """An objective's plain dict with its kind's aliases renamed to their fields (e.g. the settings a
    checkpoint saved before a field was renamed); a dict of an unknown kind is returned as is."""
    from bipost.kinds import kinds

    cls = kinds().get(str(data.get("kind", C.ObjectiveConfig.kind)))
    return dict(data) if cls is None else _aliases_renamed(cls.config_class, data, where)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------- overrides

def apply_override(tree: dict, assignment: str) -> None:
    """Apply ``a.b.c=value`` (list items by index: ``objectives.1.weight=0.3``) to a plain dict."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form key.sub=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            idx = _index(part, node, key)
            node = node[idx]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if parts[i + 1].isdigit() else {}
        node = node[part]
    last = parts[-1]
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(node, list):
        idx = int(last) if last.isdigit() else None
        if idx is None:
            raise ConfigError(f"override {assignment!r}: {last!r} is not a list index")
        while len(node) <= idx:
            node.append({})
        node[idx] = value
    else:
        node[last] = value


def _index(part: str, node: list, key: str) -> int:
    if not part.isdigit():
        raise ConfigError(f"override {key!r}: {part!r} must be a list index")
    idx = int(part)
    while len(node) <= idx:  # allow adding objectives from the command line
        node.append({})
    return idx


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> C.RunConfig:
    """Read YAML (optional), apply overrides, build and validate a ``RunConfig``."""
    cfg = from_dict(C.RunConfig, load_tree(path, overrides))
    validate(cfg)
    return cfg


def load_tree(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The plain dict of a YAML file (optional) with the overrides applied, before typing."""
    tree: dict = {}
    if path is not None:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for ov in overrides:
        apply_override(tree, ov)
    return tree


# ---------------------------------------------------------------- validation

def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: C.RunConfig) -> None:
    """Fill derived defaults (names, batch sizes) and reject configs that cannot run."""
    _check(bool(cfg.model.path), "model.path is required (a hub name or a local directory)")
    _check(len(cfg.objectives) >= 1, "objectives: give at least one objective")
    seen: dict[str, int] = {}
    for i, obj in enumerate(cfg.objectives):
        w = f"objectives.{i}"
        if obj.name is None:
            seen[obj.kind] = seen.get(obj.kind, 0) + 1
            obj.name = obj.kind if seen[obj.kind] == 1 else f"{obj.kind}_{seen[obj.kind]}"
        _check(bool(obj.data.path), f"{w}.data.path is required")
        _check(obj.weight >= 0, f"{w}.weight must be >= 0")
        obj.batch_size = obj.batch_size or cfg.train.batch_size
        obj.micro_batch_size = obj.micro_batch_size or min(cfg.train.micro_batch_size, obj.batch_size)
        _check(obj.batch_size % obj.micro_batch_size == 0,
               f"{w}: batch_size {obj.batch_size} must be a multiple of micro_batch_size {obj.micro_batch_size}")
        _check(obj.data.max_len >= 4, f"{w}.data.max_len must be >= 4")
        _check(0.0 <= obj.data.eval_fraction < 1.0, f"{w}.data.eval_fraction must be in [0, 1)")
        _check(obj.data.weight_key is None or bool(obj.data.weight_key),
               f"{w}.data.weight_key names a column (unset: no per-row weights)")
        _check(obj.data.missing_weight is None or (math.isfinite(obj.data.missing_weight)
                                                   and obj.data.missing_weight >= 0),
               f"{w}.data.missing_weight must be a finite number >= 0")
        _check(obj.data.missing_weight is None or bool(obj.data.weights_file),
               f"{w}.data.missing_weight is the weight of rows data.weights_file does not list: set data.weights_file")
        from bipost.kinds import get_kind

        _check(isinstance(obj, get_kind(obj.kind).config_class),
               f"{w}: a {obj.kind} objective's config must be a {get_kind(obj.kind).config_class.__name__}")
        obj.check(w)
    names = [o.name for o in cfg.objectives]
    _check(len(set(names)) == len(names), f"objective names must be unique, got {names}")
    total = sum(o.weight for o in cfg.objectives)
    _check(total > 0, "objective weights sum to 0")
    for o in cfg.objectives:
        o.weight = o.weight / total
    _validate_selector(cfg)
    s = cfg.schedule
    from bipost.schedules import SCHEDULES  # late import: schedules import config

    _check(s.name in SCHEDULES, f"schedule.name must be one of {sorted(SCHEDULES)}, not {s.name!r}")
    if s.name == "single":
        _check(len(cfg.objectives) == 1,
               f"schedule 'single' trains one objective; {len(cfg.objectives)} given "
               f"(pick sequential, mix, alright, maxright or bilevel)")
    _check(s.max_eval_steps >= 1, "schedule.max_eval_steps must be >= 1")
    o = cfg.optim
    _check(o.lr > 0, "optim.lr must be > 0")
    _check(o.scheduler in ("constant", "linear", "cosine"), "optim.scheduler must be constant, linear or cosine")
    _check(len(o.betas) == 2, "optim.betas takes two numbers")
    t = cfg.train
    _check(t.max_steps is None or t.max_steps >= 1, "train.max_steps must be >= 1")
    _check(t.keep_last >= 1, "train.keep_last must be >= 1")
    t.resume = _resume_mode(t.resume)
    _check(t.max_skipped_steps >= 1, "train.max_skipped_steps must be >= 1")
    t.save_on_signals = [_signal_name(s) for s in t.save_on_signals]
    _check(t.prefetch >= 0, "train.prefetch must be >= 0")
    for sink in t.report_to:
        _check(sink in SINKS, f"train.report_to: unknown sink {sink!r} ({', '.join(SINKS)})")
    for p in t.ref_pareto:
        _check(len(p) == len(cfg.objectives),
               f"train.ref_pareto: each point needs {len(cfg.objectives)} losses (one per objective), got {p}")
    if t.early_stop_eps is not None:
        _check(all(o.optimum is not None for o in cfg.objectives),
               "train.early_stop_eps needs objectives.N.optimum (f_i*) for every objective")
    d = cfg.dist
    _check(d.backend in ("auto", "ddp", "fsdp2", "deepspeed"), "dist.backend must be auto, ddp, fsdp2 or deepspeed")
    _check(d.zero_stage in (0, 1, 2, 3), "dist.zero_stage must be 0, 1, 2 or 3")
    _check(d.timeout > 0, "dist.timeout must be > 0 seconds")
    _check(cfg.model.dtype in ("auto", "float32", "bfloat16", "float16"), "model.dtype: auto|float32|bfloat16|float16")
    validate_eval(cfg)


SINKS = ("tensorboard", "wandb", "mlflow", "trackio")
"""Metric sinks ``train.report_to`` may name (``bipost.train.metrics``)."""


def validate_eval(cfg: C.RunConfig) -> None:
    """Benchmarks and generation metrics (``eval``)."""
    e, every = cfg.eval, cfg.train.eval_steps
    for key in ("benchmark_steps", "generation_steps"):
        steps = getattr(e, key)
        _check(steps >= 0, f"eval.{key} must be >= 0 (0: at the last evaluation only)")
        if steps:
            # They run at the loop's held-out evaluations, so they must fall on one.
            _check(every > 0 and steps % every == 0,
                   f"eval.{key}={steps} must be a multiple of train.eval_steps ({every}): they run at held-out "
                   f"evaluations")
    for i, b in enumerate(e.benchmarks):
        _check(bool(b.task.strip()), f"eval.benchmarks.{i}.task is required (a task name or a task YAML path)")
        _check(b.num_fewshot is None or b.num_fewshot >= 0, f"eval.benchmarks.{i}.num_fewshot must be >= 0")
        _check(b.limit is None or b.limit > 0, f"eval.benchmarks.{i}.limit must be > 0")
    _check(e.benchmark_batch_size >= 1, "eval.benchmark_batch_size must be >= 1")
    names = [o.name for o in cfg.objectives]
    for name in e.objectives:
        _check(name in names, f"eval.objectives: {name!r} is not an objective name ({names})")
    _check(e.max_prompts is None or e.max_prompts >= 1, "eval.max_prompts must be >= 1 (or unset: all)")
    _check(e.max_new_tokens >= 1, "eval.max_new_tokens must be >= 1")
    _check(e.batch_size >= 1, "eval.batch_size must be >= 1")
    _check(e.temperature >= 0, "eval.temperature must be >= 0 (0: greedy)")
    _check(0 < e.top_p <= 1, "eval.top_p must be in (0, 1]")
    _check(e.top_k >= 0, "eval.top_k must be >= 0 (0: off)")
    j = e.judge
    _check(not (j.model and j.function), "eval.judge: set judge.model (a reward model) or judge.function, not both")
    _check(not j.enabled or e.generate, "eval.judge scores generations: set eval.generate=true")
    _check(j.batch_size >= 1, "eval.judge.batch_size must be >= 1")
    _check(j.dtype in ("auto", "float32", "bfloat16", "float16"), "eval.judge.dtype: auto|float32|bfloat16|float16")
    if j.function:
        from bipost.rewards import BUILTINS

        _check(j.function in BUILTINS or ":" in j.function,
               f"eval.judge.function {j.function!r} is neither a built-in reward ({', '.join(BUILTINS)}) nor an "
               f"import path 'module:function'")


def _resume_mode(value) -> str:
    mode = str(value).strip().lower()
    mode = {"1": "true", "yes": "true", "on": "true", "0": "false", "no": "false", "off": "false"}.get(mode, mode)
    _check(mode in ("true", "false", "auto"), f"train.resume must be true, false or auto, not {value!r}")
    return mode


CATCHABLE_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP")
"""Signals ``train.save_on_signals`` may name (SIGKILL and SIGSTOP cannot be caught)."""


def _signal_name(name: str) -> str:
    full = str(name).strip().upper()
    full = full if full.startswith("SIG") else "SIG" + full
    _check(full in CATCHABLE_SIGNALS, f"train.save_on_signals: {name!r} is not one of {', '.join(CATCHABLE_SIGNALS)}")
    return full


def _validate_selector(cfg: C.RunConfig) -> None:
    """The bilevel schedule and the data selector."""
    s, sel = cfg.schedule, cfg.selector
    _check(s.lambda_decay >= 0, "schedule.lambda_decay must be >= 0")
    if s.name == "bilevel":
        _check(len(cfg.objectives) == 2,
               f"schedule 'bilevel' takes exactly two objectives (upper level first, lower level second); "
               f"{len(cfg.objectives)} given")
    if not sel.enabled:
        return
    _check(len(cfg.objectives) >= 2, "selector.enabled needs two objectives: the trusted (upper-level) one "
                                     "first and the one whose rows are weighted (lower level) second")
    _check(s.name != "single", "selector.enabled trains the upper and the lower objective together: set "
                               "schedule.name (bilevel: the seeds' penalty method; `bipost select` defaults to it)")
    names = [o.name for o in cfg.objectives]
    sel.objective = sel.objective or names[-1]
    _check(sel.objective in names, f"selector.objective {sel.objective!r} is not an objective name ({names})")
    _check(sel.activation in ("softmax", "sigmoid"), f"selector.activation must be softmax or sigmoid, "
                                                     f"not {sel.activation!r}")
    _check(sel.lr > 0, "selector.lr must be > 0")
    _check(len(sel.betas) == 2 and all(0 <= b < 1 for b in sel.betas), "selector.betas takes two numbers in [0, 1)")
    _check(sel.max_grad_norm >= 0, "selector.max_grad_norm must be >= 0 (0 disables clipping)")
    _check(sel.scheduler in ("constant", "linear", "cosine"), "selector.scheduler must be constant, linear or cosine")
    _check(sel.warmup_steps >= 0, "selector.warmup_steps must be >= 0")
    _check(bool(sel.formats) and all(f in ("parquet", "jsonl") for f in sel.formats),
           f"selector.formats: one or both of parquet, jsonl (got {sel.formats})")
    _check(bool(sel.name) and "/" not in sel.name and sel.name not in (".", "..", "final", "checkpoints"),
           f"selector.name must be a plain folder name other than final/checkpoints, not {sel.name!r}")
    _check(sel.summary_rows >= 0, "selector.summary_rows must be >= 0")
    _check(sel.every_epochs >= 0, "selector.every_epochs must be >= 0 (0: outputs only at the end)")


# ---------------------------------------------------------------- help from attribute docstrings

@lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field) of a dataclass."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def describe(cls=C.RunConfig, prefix: str = "") -> list[str]:
    """One line per leaf field: ``dotted.name (type, default): docstring``; each objective kind's
    own fields follow the common objective fields."""
    lines = []
    hints = _type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            lines.append(f"{key}: {docs.get(f.name, '')}")
            lines += describe(tp, key + ".")
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            item = typing.get_args(tp)[0]
            lines.append(f"{key}: {docs.get(f.name, '')} (a list; items:)")
            lines += describe(item, key + ".N.")
            if item is C.ObjectiveConfig:
                lines += _describe_kinds(key + ".N.")
        else:
            lines.append(_leaf(f, tp, key, docs))
    return lines


def _leaf(f: dataclasses.Field, tp: Any, key: str, docs: dict[str, str]) -> str:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    tname = getattr(tp, "__name__", str(tp)).replace("typing.", "")
    return f"  {key} ({tname}, default {default!r}): {docs.get(f.name, '')}"


def _describe_kinds(prefix: str) -> list[str]:
    from bipost.kinds import kinds

    lines = []
    common = {f.name for f in dataclasses.fields(C.ObjectiveConfig)}
    for name, kind in kinds().items():
        cls = kind.config_class
        own = [f for f in dataclasses.fields(cls) if f.name not in common]
        doc = " ".join((kind.__doc__ or "").split())
        lines.append(f"{prefix[:-1]} with kind={name}: {doc}")
        hints, docs = _type_hints(cls), field_docs(cls)
        also = {name: alias for alias, name in cls.aliases.items()}
        lines += [_leaf(f, hints[f.name], prefix + f.name, docs)
                  + (f" (also accepted as {also[f.name]})" if f.name in also else "") for f in own]
    return lines

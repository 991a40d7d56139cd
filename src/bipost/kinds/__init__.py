"""Objective kinds, found by name: every module of this package that defines an
:class:`~bipost.kinds.base.Objective` subclass with a ``kind``, and any class a package exposes in
the ``bipost.objectives`` entry-point group. Adding a kind touches its own module only."""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

from bipost.config import ConfigError
from bipost.kinds.base import BuildContext, Objective, PairObjective, StepContext

ENTRY_POINTS = "bipost.objectives"


@lru_cache(maxsize=None)
def kinds() -> dict[str, type[Objective]]:
    """Every objective kind by name (imports the kind modules once)."""
    found: dict[str, type[Objective]] = {}

    def add(cls, where: str) -> None:
        if cls.kind in found and found[cls.kind] is not cls:
            raise ConfigError(f"objective kind {cls.kind!r} is defined twice ({found[cls.kind].__module__}, {where})")
        found[cls.kind] = cls

    for info in pkgutil.iter_modules(__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, Objective) and value.kind
                    and value.__module__ == module.__name__):
                add(value, module.__name__)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINTS):
        add(ep.load(), ep.value)
    return dict(sorted(found.items()))


def get_kind(name: str) -> type[Objective]:
    """The kind called ``name``; a ``ConfigError`` listing the known ones otherwise."""
    table = kinds()
    if name not in table:
        raise ConfigError(f"unknown objective kind {name!r} (known: {', '.join(table)})")
    return table[name]


def kind_of_cli_name(name: str) -> type[Objective]:
    """The kind a seed command line names (``--obj_N SFT``; any case)."""
    for cls in kinds().values():
        if cls.cli_name.lower() == name.strip().lower():
            return cls
    raise ConfigError(f"{name!r} is not an objective ({', '.join(c.cli_name for c in kinds().values())}, any case)")


def make_objective(kind: str, forward=None, packing: bool = False, frozen=None, **fields) -> Objective:
    """An objective of ``kind`` outside a run (tests, benchmarks, notebooks): its config with
    ``fields``, a :class:`~bipost.modeling.forward.Forward` (default options when None), and
    ``frozen`` as its reference or teacher model (the kind's ``seed_model`` role)."""
    cls = get_kind(kind)
    cfg = cls.config_class(kind=kind, name=fields.pop("name", kind), **fields)
    needs = {cls.seed_model: frozen} if cls.seed_model and frozen is not None else {}
    return cls(cfg, forward, packing, **needs)


__all__ = ["BuildContext", "Objective", "PairObjective", "StepContext", "get_kind", "kind_of_cli_name", "kinds", "make_objective"]

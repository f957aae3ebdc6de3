"""Recipes: one Python file with a config and the user's functions.

The decorators only tag a function with its role; ``load_recipe`` finds the tagged functions in
the module. There is no global registry, so two recipes can be loaded in one process (tests do).

    import miles

    config = miles.MilesConfig(...)

    @miles.reward
    def exact_answer(sample: miles.Sample) -> float: ...

    @miles.rollout                      # optional: custom generation, gets an engine handle
    async def solve(engine: miles.EngineHandle, task: miles.Task) -> list[miles.Sample]: ...

    @miles.update                       # optional: custom loss in plain PyTorch
    def step(model, batch: miles.TensorBatch, optimizer) -> dict[str, float]: ...

    @miles.setup                        # optional: runs once in `miles run` before services
    def prepare(config: miles.MilesConfig) -> miles.MilesConfig: ...

    @miles.dataset                      # optional: rows from code instead of data.train_path
    def prompts(split: str) -> Iterable[dict]: ...   # {"prompt": ..., "label": ..., ...}
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from miles.config import MilesConfig

F = TypeVar("F", bound=Callable[..., Any])
_ROLE = "__miles_role__"
ROLES = ("reward", "rollout", "update", "setup", "dataset")


def _tag(role: str) -> Callable[[F], F]:
    def decorate(fn: F) -> F:
        setattr(fn, _ROLE, role)
        return fn

    decorate.__name__ = role
    decorate.__doc__ = f"Mark a function as the recipe's {role} function."
    return decorate


reward = _tag("reward")
rollout = _tag("rollout")
update = _tag("update")
setup = _tag("setup")
dataset = _tag("dataset")


class RecipeError(ValueError):
    """A recipe file that cannot be used, with a message saying what to fix."""


def _where(exc: BaseException, path: Path) -> str:
    """``file:line: Type: message`` of the innermost frame in the recipe's directory."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{Path(exc.filename).name}:{exc.lineno}: SyntaxError: {exc.msg}"
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).parent == path.parent
    ]
    place = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}: " if frames else ""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{place}{type(exc).__name__}: {message}"


@dataclass(frozen=True)
class Recipe:
    path: Path
    config: MilesConfig
    rewards: dict[str, Callable[..., Any]]
    rollout: Callable[..., Any] | None = None
    update: Callable[..., Any] | None = None
    setup: Callable[..., Any] | None = None
    dataset: Callable[..., Any] | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def load_recipe(path: str | Path) -> Recipe:
    """Import a recipe file and collect its config and tagged functions."""
    path = Path(path).resolve()
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist")
    name = f"miles_recipe_{path.stem}_{abs(hash(path)) % 10**8}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RecipeError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so pickling-free tools (dataclasses, typing) can resolve it
    sys.path.insert(0, str(path.parent))  # a recipe may import its sibling modules
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's module: say where it broke, in one line
        raise RecipeError(f"{path.name} failed to import: {_where(exc, path)}") from exc

    by_role: dict[str, list[Callable[..., Any]]] = {role: [] for role in ROLES}
    for value in vars(module).values():
        role = getattr(value, _ROLE, None) if callable(value) else None
        if role in by_role:
            by_role[role].append(value)
    for role in ("rollout", "update", "setup", "dataset"):
        if len(by_role[role]) > 1:
            names = ", ".join(fn.__name__ for fn in by_role[role])
            raise RecipeError(f"{path.name}: at most one @miles.{role} function, found {names}")
    if not by_role["reward"]:
        raise RecipeError(f"{path.name}: no @miles.reward function; a recipe needs one")
    config = getattr(module, "config", None)
    if config is None:
        config = MilesConfig()
    if not isinstance(config, MilesConfig):
        raise RecipeError(f"{path.name}: `config` must be a miles.MilesConfig")

    def first(role: str) -> Callable[..., Any] | None:
        return by_role[role][0] if by_role[role] else None

    return Recipe(
        path=path,
        config=config,
        rewards={fn.__name__: fn for fn in by_role["reward"]},
        rollout=first("rollout"),
        update=first("update"),
        setup=first("setup"),
        dataset=first("dataset"),
    )

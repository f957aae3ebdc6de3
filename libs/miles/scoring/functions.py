"""The recipe's ``@miles.reward`` functions as scorers, in either signature.

Per sample (miles' own): ``fn(sample) -> float``, one call per sample, so one failure fails
one sample. Batched (TRL's): ``fn(prompts, completions, **columns) -> list[float]``, one call
per group; ``columns`` are the dataset's other columns (the label's included) as lists, plus
``completion_ids``. A function is batched when it has a ``completions`` parameter.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from miles.events import Sample
from miles.scoring.limits import Failure, Limits, Outcome


def is_batched(fn: Callable[..., Any]) -> bool:
    return "completions" in inspect.signature(fn).parameters


def describe(name: str, exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"{name} timed out after {timeout:g}s (reward.timeout_seconds)"
    return f"{name} raised {type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class PerSample:
    name: str
    fn: Callable[[Sample], Any]

    async def score(self, samples: Sequence[Sample], limits: Limits) -> list[Outcome]:
        return list(await asyncio.gather(*(self._one(s, limits) for s in samples)))

    async def _one(self, sample: Sample, limits: Limits) -> Outcome:
        try:
            return float(await limits.call(self.fn, sample))
        except Exception as exc:  # noqa: BLE001 - user code: record any failure on the sample
            return Failure(describe(self.name, exc, limits.timeout))


@dataclass(frozen=True)
class Batched:
    name: str
    fn: Callable[..., Any]

    async def score(self, samples: Sequence[Sample], limits: Limits) -> list[Outcome]:
        try:
            values = await limits.call(self.fn, **self.arguments(samples))
            values = [float(v) for v in values]
        except Exception as exc:  # noqa: BLE001 - user code: record any failure on the samples
            return [Failure(describe(self.name, exc, limits.timeout))] * len(samples)
        if len(values) != len(samples):
            error = f"{self.name} returned {len(values)} rewards for {len(samples)} completions"
            return [Failure(error)] * len(samples)
        return list(values)

    def arguments(self, samples: Sequence[Sample]) -> dict[str, Any]:
        """TRL's keyword arguments: prompts, completions, completion_ids and each column,
        only those the function takes unless it takes ``**kwargs``."""
        columns: dict[str, list[Any]] = {}
        for sample in samples:
            for key in sample.metadata:
                columns.setdefault(key, [])
        for key, values in columns.items():
            values.extend(sample.metadata.get(key) for sample in samples)
        arguments: dict[str, Any] = {
            **columns,
            "prompts": [s.prompt for s in samples],
            "completions": [s.response_text for s in samples],
            "completion_ids": [s.response_ids for s in samples],
        }
        parameters = inspect.signature(self.fn).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return arguments
        return {k: v for k, v in arguments.items() if k in parameters}


def from_recipe(rewards: Mapping[str, Callable[..., Any]]) -> list[PerSample | Batched]:
    return [Batched(n, fn) if is_batched(fn) else PerSample(n, fn) for n, fn in rewards.items()]

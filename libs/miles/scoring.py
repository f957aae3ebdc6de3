"""Applying the recipe's reward functions to a sample, safely.

A reward function that raises, or returns NaN or an infinity, marks the sample failed with the
error recorded; it never crashes the reward service. Several ``@miles.reward`` functions add up.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

from miles.events import Sample


async def score(sample: Sample, rewards: Mapping[str, Callable[..., Any]]) -> dict[str, float]:
    """Set ``sample.reward`` (or ``failed``); return each function's value (none if failed),
    for the per-function reward histograms."""
    values: dict[str, float] = {}
    for name, fn in rewards.items():
        try:
            value = fn(sample)
            if inspect.isawaitable(value):
                value = await value
            value = float(value)
        except Exception as exc:  # noqa: BLE001 - user code: record any failure on the sample
            _failed(sample, f"{name} raised {type(exc).__name__}: {exc}")
            return {}
        if not math.isfinite(value):
            _failed(sample, f"{name} returned {value!r}, not a finite number")
            return {}
        values[name] = value
    sample.reward = sum(values.values())
    return values


MAX_ERROR_CHARS = 1000


def _failed(sample: Sample, error: str) -> None:
    sample.failed = True
    sample.error = error[:MAX_ERROR_CHARS]
    sample.reward = 0.0

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


async def score(sample: Sample, rewards: Mapping[str, Callable[..., Any]]) -> Sample:
    total = 0.0
    for name, fn in rewards.items():
        try:
            value = fn(sample)
            if inspect.isawaitable(value):
                value = await value
            value = float(value)
        except Exception as exc:  # noqa: BLE001 - user code: record any failure on the sample
            return _failed(sample, f"{name} raised {type(exc).__name__}: {exc}")
        if not math.isfinite(value):
            return _failed(sample, f"{name} returned {value!r}, not a finite number")
        total += value
    sample.reward = total
    return sample


MAX_ERROR_CHARS = 1000


def _failed(sample: Sample, error: str) -> Sample:
    sample.failed = True
    sample.error = error[:MAX_ERROR_CHARS]
    sample.reward = 0.0
    return sample

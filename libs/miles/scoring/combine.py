"""Every scorer on a group's samples at once, and their weighted sum as each sample's reward.

A sample fails (``failed``, ``error``, reward 0; the buffer drops it) when any scorer could not
score it, or gave NaN or an infinity: a partial sum would be a different reward.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence

from miles.events import Sample
from miles.scoring.limits import Failure, Limits, Outcome, Scorer

MAX_ERROR_CHARS = 1000


async def score_samples(
    samples: Sequence[Sample],
    scorers: Sequence[Scorer],
    weights: Mapping[str, float],
    limits: Limits,
) -> list[dict[str, float]]:
    """Set each sample's ``reward`` (or ``failed``); return each scorer's value per sample
    (none for a failed sample), for the per-function reward histograms."""
    outcomes = await asyncio.gather(*(scorer.score(samples, limits) for scorer in scorers))
    values: list[dict[str, float]] = []
    for index, sample in enumerate(samples):
        mine: dict[str, float] = {}
        for scorer, outcome in zip(scorers, outcomes, strict=True):
            value: Outcome = outcome[index]
            if isinstance(value, float) and not math.isfinite(value):
                value = Failure(f"{scorer.name} returned {value!r}, not a finite number")
            if isinstance(value, Failure):
                _failed(sample, value.error)
                mine = {}
                break
            mine[scorer.name] = value
        if mine:
            sample.reward = sum(weights.get(name, 1.0) * v for name, v in mine.items())
        values.append(mine)
    return values


def _failed(sample: Sample, error: str) -> None:
    sample.failed = True
    sample.error = error[:MAX_ERROR_CHARS]
    sample.reward = 0.0

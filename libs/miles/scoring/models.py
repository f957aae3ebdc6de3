"""Reward models as scorers: a Hugging Face sequence classifier on a Ray actor, or HTTP.

An ``hf`` model needs the process to be connected to Ray (the reward service connects when one
is configured); its module, with torch and transformers, is imported only then.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from miles.config import HTTPRewardModel, MilesConfig
from miles.scoring.http_model import HTTPScorer
from miles.scoring.limits import Scorer


@runtime_checkable
class Closable(Protocol):
    async def close(self) -> None: ...


def reward_models(config: MilesConfig) -> list[Scorer]:
    """One scorer per ``reward.models`` entry, in order."""
    scorers: list[Scorer] = []
    for model in config.reward.models:
        if isinstance(model, HTTPRewardModel):
            scorers.append(HTTPScorer(model))
        else:
            from miles.scoring.hf_model import HFScorer

            scorers.append(HFScorer(model))
    return scorers


async def close_models(scorers: Sequence[Scorer]) -> None:
    """Close the HTTP sessions and stop the actors the reward models hold."""
    for scorer in scorers:
        if isinstance(scorer, Closable):
            await scorer.close()

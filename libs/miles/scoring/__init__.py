"""Rewards: the recipe's functions and the configured reward models, run under one bound.

``Scorer`` is the seam: anything that turns a list of samples into one value (or a ``Failure``)
per sample. A per-sample function ``fn(sample) -> float``, a batched one in TRL's signature
``fn(prompts, completions, **columns) -> list[float]``, a Hugging Face reward model on a Ray
actor and a remote one over HTTP are all scorers; ``score_samples`` weighs and sums them.
"""

from miles.scoring.combine import score_samples
from miles.scoring.functions import Batched, PerSample, from_recipe, is_batched
from miles.scoring.limits import Failure, Limits, Outcome, Scorer

__all__ = [
    "Batched",
    "Failure",
    "Limits",
    "Outcome",
    "PerSample",
    "Scorer",
    "from_recipe",
    "is_batched",
    "score_samples",
]

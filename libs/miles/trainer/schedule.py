"""Learning-rate schedules: the rate of a committed step as a pure function of the step.

A step's rate depends on nothing but its number and the config, so a trainer that resumes from
any manifest trains the next step at exactly the rate an uninterrupted run would have used, with
no scheduler state to save or restore. Every optimizer step of one committed step (several with
``ppo_epochs`` or ``mini_batches``) uses that step's rate.

``factor(step)``, for the step trained from the weights of committed step ``step`` (0-based):

* warmup: ``(step + 1) / warmup_steps`` while ``step < warmup_steps`` (linear from
  ``1 / warmup_steps``, so the first step does not train at a rate of 0);
* then, with ``progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)`` clamped
  to [0, 1] and ``m = min_lr_ratio``:
  constant ``1``; linear ``1 - (1 - m) * progress``;
  cosine ``m + (1 - m) * (1 + cos(pi * progress)) / 2`` (Loshchilov and Hutter 2017,
  arXiv:1608.03983, eq. 5, one cycle without restarts).
"""

from __future__ import annotations

import math
from typing import Literal, TypeAlias

Schedule: TypeAlias = Literal["constant", "linear", "cosine"]


def lr_factor(
    step: int, schedule: Schedule, warmup_steps: int, decay_steps: int, min_lr_ratio: float
) -> float:
    """The multiplier of the base learning rate for the step trained after ``step``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps)))
    if schedule == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 + math.cos(math.pi * progress)) / 2

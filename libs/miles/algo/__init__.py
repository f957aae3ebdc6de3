"""RL objectives as pure tensor functions: advantages, surrogate losses, KL penalties."""

from miles.algo.grpo import (
    Aggregation,
    KLEstimator,
    PolicyLossStats,
    clipped_policy_loss,
    group_advantages,
    kl_penalty,
    masked_aggregate,
)

__all__ = [
    "Aggregation",
    "KLEstimator",
    "PolicyLossStats",
    "clipped_policy_loss",
    "group_advantages",
    "kl_penalty",
    "masked_aggregate",
]

"""GRPO's advantage, clipped surrogate and KL penalty as pure tensor functions.

Shapes: ``N`` sequences, ``T`` token positions. ``mask`` is 1 on response tokens and 0 on prompt
and padding; every per-token tensor shares its ``[N, T]`` layout. Nothing here touches a model.

Where this departs from the textbook:

* The objective is the token-level PPO surrogate of GRPO (Shao et al. 2024, arXiv:2402.03300,
  eq. 3) with DAPO's decoupled clip range ``eps_low != eps_high`` (Yu et al. 2025,
  arXiv:2503.14476, sec. 3.1 "Clip-Higher").
* ``aggregation="token"`` is DAPO's token-level mean (sec. 3.3: one sum over all tokens of the
  batch divided by the total token count); ``"sequence"`` is GRPO's per-sequence mean then mean
  over sequences (eq. 3: ``1/G sum_i 1/|o_i| sum_t``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Aggregation = Literal["token", "sequence"]
KLEstimator = Literal["k1", "k3"]


def group_advantages(rewards: Tensor, scale_by_std: bool, eps: float = 1e-6) -> Tensor:
    """Outcome-supervised GRPO advantages, one per sample, for ``rewards`` of shape ``[groups, G]``.

    GRPO (arXiv:2402.03300, sec. 4.1.2, outcome supervision): ``A_i = (r_i - mean(r)) / std(r)``,
    where ``eps`` keeps a zero-variance group at exactly zero instead of 0/0 = NaN.
    ``scale_by_std=False`` is Dr.GRPO (Liu et al. 2025, arXiv:2503.20783, sec. 3.1): dividing by
    the std up-weights groups that are nearly all right or all wrong, so it keeps only ``r - mean``.

    The std is the population one (divide by G, not G-1): the group is the whole population we
    normalise, so its advantages get unit variance exactly, and ``[1, 0, 0, 1]`` maps to
    ``±0.5 / 0.5 = ±1``. TRL and verl use Bessel's ``G-1``; that scales every advantage by
    ``sqrt((G-1)/G)``, the same as a slightly smaller learning rate.
    """
    centered = rewards - rewards.mean(dim=-1, keepdim=True)
    if not scale_by_std:
        return centered
    return centered / (rewards.std(dim=-1, keepdim=True, correction=0) + eps)


def masked_aggregate(values: Tensor, mask: Tensor, aggregation: Aggregation) -> Tensor:
    """Reduce per-token ``values`` ``[N, T]`` to a scalar over the positions where ``mask`` is 1.

    ``token``: ``sum(values * mask) / sum(mask)``, every token weighs the same, so long answers
    are not diluted (DAPO, arXiv:2503.14476, sec. 3.3). ``sequence``: the mean of each sequence,
    then the mean over sequences (GRPO, arXiv:2402.03300, eq. 3). A sequence with no masked token
    has no mean and yields NaN under ``sequence``.
    """
    masked = values * mask
    if aggregation == "token":
        return masked.sum() / mask.sum()
    return (masked.sum(dim=-1) / mask.sum(dim=-1)).mean()


@dataclass(frozen=True)
class PolicyLossStats:
    """Token means over the masked positions."""

    clip_fraction: float
    """Share of tokens whose gradient the clip removes (the min picked the clipped term)."""
    ratio_mean: float
    """Mean importance ratio pi_theta / pi_old; 1 on the first on-policy step."""


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float,
    eps_high: float,
    aggregation: Aggregation,
) -> tuple[Tensor, PolicyLossStats]:
    """The clipped surrogate loss to minimise; ``advantages`` is ``[N]``, one per sequence.

    PPO (Schulman et al. 2017, arXiv:1707.06347, eq. 7), per token t:
    ``r_t = exp(logp_t - old_logp_t)`` and
    ``loss_t = -min(r_t * A, clip(r_t, 1 - eps_low, 1 + eps_high) * A)``,
    with DAPO's asymmetric range (arXiv:2503.14476, sec. 3.1). Every token of a sequence shares the
    sequence's advantage (GRPO outcome supervision, arXiv:2402.03300, sec. 4.1.2).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    advantage = advantages.unsqueeze(-1)
    unclipped = ratio * advantage
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantage
    loss = masked_aggregate(-torch.minimum(unclipped, clipped), mask, aggregation)

    with torch.no_grad():
        # The clip bites only on the side the advantage pushes towards: above 1 + eps_high when
        # A > 0, below 1 - eps_low when A < 0. There the min is the constant clipped term.
        clipped_high = (ratio > 1.0 + eps_high) & (advantage > 0)
        clipped_low = (ratio < 1.0 - eps_low) & (advantage < 0)
        is_clipped = (clipped_high | clipped_low).float()
        stats = PolicyLossStats(
            clip_fraction=masked_aggregate(is_clipped, mask, "token").item(),
            ratio_mean=masked_aggregate(ratio, mask, "token").item(),
        )
    return loss, stats


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator) -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from tokens sampled from pi_theta.

    Schulman, "Approximating KL Divergence" (2020, joschu.net/blog/kl-approx.html), with
    ``log_ratio = ref_logp - logp``:
    ``k1 = -log_ratio`` is unbiased but has high variance and goes negative per token;
    ``k3 = exp(log_ratio) - log_ratio - 1`` is unbiased, never negative and has low variance.
    GRPO puts k3 in the loss (arXiv:2402.03300, eq. 4). Aggregate with ``masked_aggregate``.
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    return torch.exp(log_ratio) - log_ratio - 1.0

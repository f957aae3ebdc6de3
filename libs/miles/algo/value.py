"""The critic's loss (PPO with a value model)."""

from __future__ import annotations

import torch
from torch import Tensor

from miles.algo.aggregation import Aggregation, aggregate


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip: float,
    mode: Aggregation = "token_mean",
) -> tuple[Tensor, float]:
    """``0.5 * agg(max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2))``: the value
    regression of PPO's implementations (OpenAI baselines ppo2; Engstrom et al. 2020,
    arXiv:2005.12729, sec. 3 "value function clipping"), which keeps a new estimate within ``c``
    of the one the advantages were computed with unless that makes the error smaller. Returns
    the loss and the share of tokens where the clipped term was larger (token mean)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_error = (values - returns).square()
    clipped_error = (clipped - returns).square()
    loss = 0.5 * aggregate(torch.maximum(unclipped_error, clipped_error), mask, mode)
    with torch.no_grad():
        bitten = (clipped_error > unclipped_error).to(mask.dtype)
        fraction = float(((bitten * mask).sum() / mask.sum()).item())
    return loss, fraction


def outcome_rewards(scores: Tensor, mask: Tensor) -> Tensor:
    """``[N, T]`` per-token rewards with each sequence's score on its last response token and 0
    elsewhere: an outcome reward as the per-token MDP of RLHF sees it (Ouyang et al. 2022).

    "Last" is the last position ``mask`` trains: in a multi-turn sample, the policy's last own
    token, even when an environment turn follows it. The outcome rewards the policy's last
    action; environment tokens are transitions, not actions, so a reward put on one would be
    masked away, and GAE and REINFORCE++'s returns carry over them to the trained tokens before.
    """
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = (positions * (mask > 0)).max(dim=1).values
    rewards = torch.zeros_like(mask, dtype=scores.dtype)
    rewards[torch.arange(mask.shape[0]), last] = scores
    return rewards * mask


def masked_whiten(values: Tensor, mask: Tensor) -> Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` over the masked positions, with Bessel's correction,
    as PPO implementations normalise advantages over a batch (Andrychowicz et al. 2020,
    arXiv:2006.05990, sec. 3.4: per-minibatch advantage normalisation)."""
    tokens = mask.sum()
    mean = (values * mask).sum() / (tokens + 1e-8)
    variance = ((values - mean).square() * mask).sum() / (tokens + 1e-8)
    variance = variance * tokens / (tokens - 1)
    return (values - mean) * torch.rsqrt(variance + 1e-8)

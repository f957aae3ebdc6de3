"""Advantage estimators: one scalar per sample, from the rewards of its group or its batch.

Outcome supervision: a sample has one reward, so every token of a response shares one
advantage. Inputs are float64 so that the estimators are exact references for the float32 loss.
Shapes: ``[groups, G]`` for the group estimators (one row a prompt's G samples), ``[N]`` for the
batch estimator.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from miles.algo.value import masked_whiten

Std = Literal["population", "bessel", "none"]


def group_normalized(rewards: Tensor, std: Std, eps: float = 1e-6) -> Tensor:
    """GRPO's outcome advantage (Shao et al. 2024, arXiv:2402.03300, sec. 4.1.2):
    ``A_i = (r_i - mean(r)) / (std(r) + eps)`` over the G samples of a prompt.

    ``std="population"`` divides by G: the group is the whole population normalised, so its
    advantages get unit variance exactly (``[1, 0, 0, 1]`` maps to ``±0.5 / 0.5 = ±1``).
    ``"bessel"`` divides by G - 1, as verl (``torch.std``) and TRL do: every advantage shrinks by
    ``sqrt((G - 1) / G)``, the same as a slightly smaller learning rate. ``"none"`` is Dr.GRPO
    (Liu et al. 2025, arXiv:2503.20783, sec. 3.1): the std division up-weights groups that are
    nearly all right or all wrong, so only ``r - mean`` is kept. ``eps`` keeps a zero-variance
    group at exactly 0 instead of 0/0.
    """
    centered = rewards - rewards.mean(dim=-1, keepdim=True)
    if std == "none":
        return centered
    correction = 1 if std == "bessel" else 0
    return centered / (rewards.std(dim=-1, keepdim=True, correction=correction) + eps)


def leave_one_out(rewards: Tensor) -> Tensor:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024, arXiv:2402.14740, eq. 6): each sample's
    baseline is the mean of the other ``G - 1`` rewards of its group,
    ``A_i = r_i - 1/(G-1) sum_{j != i} r_j = G/(G-1) * (r_i - mean(r))``: unbiased, since the
    baseline does not depend on the sample it scores."""
    size = rewards.shape[-1]
    others = (rewards.sum(dim=-1, keepdim=True) - rewards) / (size - 1)
    return rewards - others


def batch_whitened(rewards: Tensor, lengths: Tensor, group_means: Tensor | None) -> Tensor:
    """REINFORCE++ (Hu 2025, arXiv:2501.03262, sec. 3.2): no critic, and the advantage
    normalised over the whole batch, ``A = (r - mu) / sqrt(var + 1e-8)``, instead of per prompt.

    ``rewards`` ``[N]`` are the samples of the batch and ``lengths`` ``[N]`` their response
    tokens. The statistics are over tokens, every token carrying its sequence's return (as
    verl's ``masked_whiten`` computes them, with Bessel's correction over the token count), so a
    long response weighs more. ``group_means`` ``[N]`` (the mean reward of each sample's group)
    is subtracted first: REINFORCE++-baseline, for prompts sampled G times.
    """
    centered = rewards if group_means is None else rewards - group_means
    weights = lengths.to(centered.dtype)
    tokens = weights.sum()
    mean = (centered * weights).sum() / (tokens + 1e-8)
    variance = ((centered - mean) ** 2 * weights).sum() / (tokens + 1e-8)
    variance = variance * tokens / (tokens - 1)
    return (centered - mean) * torch.rsqrt(variance + 1e-8)


def reinforce_pp_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """REINFORCE++ with per-token rewards (Hu 2025, arXiv:2501.03262, sec. 3.1 and 3.2): the
    return ``G_t = sum_{s >= t} gamma^(s - t) r_s`` of each response token (the sum runs over
    response tokens only: tokens off the mask, such as a tool's output, are skipped, as in
    ``gae``), whitened over every masked token of the batch (``masked_whiten``). With the KL as
    a reward penalty each token's return carries the KL still ahead of it; with only an outcome
    reward every token's return is that reward, and this is ``batch_whitened`` without a
    baseline."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        keep = mask[:, t]
        step = rewards[:, t] + gamma * running
        returns[:, t] = step * keep
        running = step * keep + running * (1 - keep)  # carried unchanged over tool tokens
    return masked_whiten(returns, mask) * mask


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438, eq. 16):
    ``delta_t = r_t + gamma V_{t+1} - V_t`` and ``A_t = sum_l (gamma lam)^l delta_{t+l}``,
    computed backwards over ``[N, T]`` per-token rewards and critic values. Positions where
    ``mask`` is 0 (tool or padding tokens) are skipped: the recursion carries through them.
    Returns ``(advantages, returns)`` with ``returns = A + V``, the critic's regression target;
    the advantages are not whitened here.
    """
    next_value = torch.zeros_like(rewards[:, 0])
    running = torch.zeros_like(rewards[:, 0])
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        step = delta + gamma * lam * running
        keep = mask[:, t]
        next_value = values[:, t] * keep + next_value * (1 - keep)
        running = step * keep + running * (1 - keep)
        advantages[:, t] = running
    return advantages * mask, (advantages + values) * mask

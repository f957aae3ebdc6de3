"""Policy-gradient surrogates as per-token losses to minimise, ``[N, T]``.

Each returns the per-token loss before aggregation, so an importance correction can weight
tokens and ``miles.algo.aggregation`` can reduce it any way; and the statistics a step reports.
``advantages`` is ``[N]``, one per sequence: every token of a response shares its sequence's
advantage (outcome supervision, GRPO arXiv:2402.03300 sec. 4.1.2); or ``[N, T]``, one per token
(GAE). ``old_logprobs`` is pi_old of the ratio, a constant. Statistics are token means over
``mask``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PolicyLossStats:
    clip_fraction: float
    """Share of tokens whose gradient the clip changed."""
    ratio_mean: float
    """Mean importance ratio pi_theta / pi_old; 1 on the first on-policy update."""


def per_token(advantages: Tensor) -> Tensor:
    """``[N, 1]`` from one advantage per sequence (broadcast over its tokens), or ``[N, T]``
    as is (per-token advantages, GAE)."""
    return advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages


def _token_mean(values: Tensor, mask: Tensor) -> float:
    return float(((values * mask).sum() / mask.sum()).item())


def ppo_clip(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None = None,
) -> tuple[Tensor, PolicyLossStats]:
    """PPO's clipped surrogate (Schulman et al. 2017, arXiv:1707.06347, eq. 7), per token:
    ``r = exp(logp - old_logp)``, ``loss = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``, with
    DAPO's decoupled range (arXiv:2503.14476, sec. 3.1, "clip-higher"). ``dual_clip`` c bounds the
    loss of a token with ``A < 0`` by ``c |A|`` (Ye et al. 2020, arXiv:1912.09729, eq. 6), so a
    ratio far above 1 on a bad token cannot dominate the batch.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    advantage = per_token(advantages)
    unclipped = -ratio * advantage
    clipped = -torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantage
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(advantage < 0, torch.minimum(loss, -dual_clip * advantage), loss)
    with torch.no_grad():
        # The clip bites only on the side the advantage pushes towards: there the max picks
        # the constant clipped term.
        bitten = (clipped > unclipped).to(mask.dtype)
        stats = PolicyLossStats(_token_mean(bitten, mask), _token_mean(ratio, mask))
    return loss, stats


def gspo(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float,
    eps_high: float,
) -> tuple[Tensor, PolicyLossStats]:
    """GSPO (Zheng et al. 2025, arXiv:2507.18071): the ratio of a whole sequence,
    ``s_i = exp(1/|y_i| sum_t (logp - old_logp))`` (eq. 7), the geometric mean of its token
    ratios, clipped as in PPO. In the token form of sec. 4.3 (GSPO-token, eq. 13), the loss of
    token t uses ``s_i,t = sg[s_i] * pi_t / sg[pi_t]``: the value is ``s_i`` and the gradient is
    ``s_i`` times the token's own score, which with one advantage per sequence equals GSPO's
    sequence gradient once aggregated as ``seq_mean_token_mean``.
    """
    tokens = mask.sum(dim=-1).clamp(min=1)
    sequence_log_ratio = ((logprobs - old_logprobs) * mask).sum(dim=-1) / tokens
    log_ratio = sequence_log_ratio.detach().unsqueeze(-1) + logprobs - logprobs.detach()
    ratio = torch.exp(log_ratio)
    advantage = per_token(advantages)
    unclipped = -ratio * advantage
    clipped = -torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantage
    loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        bitten = (clipped > unclipped).to(mask.dtype)
        stats = PolicyLossStats(_token_mean(bitten, mask), _token_mean(ratio, mask))
    return loss, stats


def cispo(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float,
    eps_high: float,
) -> tuple[Tensor, PolicyLossStats]:
    """CISPO (MiniMax 2025, arXiv:2506.13585, eq. 4-5): REINFORCE weighted by the clipped
    importance ratio under a stop-gradient,
    ``loss_t = -sg(clip(r_t, 1 - eps_low, 1 + eps_high)) * A * logp_t``. Unlike PPO's clip, which
    zeroes the gradient of a clipped token, every token keeps its gradient; only its weight is
    bounded.
    """
    ratio = torch.exp(logprobs - old_logprobs).detach()
    weight = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = -weight * per_token(advantages) * logprobs
    bitten = (weight != ratio).to(mask.dtype)
    return loss, PolicyLossStats(_token_mean(bitten, mask), _token_mean(ratio, mask))

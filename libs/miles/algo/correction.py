"""The train/inference mismatch: how far the engine's logprobs are from the trainer's, and the
importance weights that correct for it.

An engine samples with other kernels, batching and precision than the trainer, so on-policy
data is slightly off-policy: ``w = pi_trainer / pi_engine != 1``. Truncated importance sampling
(TIS: Ionides 2008; Yao et al. 2025, "Your efficient RL framework secretly brings you
off-policy RL training") multiplies each token's loss by ``min(w, cap)``; masked importance
sampling (MIS) drops the tokens whose ``w`` leaves ``[1/cap, cap]`` instead, which keeps the
estimate unbiased on the tokens kept. ``sequence`` level uses the product of a sequence's
token ratios for every one of its tokens (Zheng et al. 2025's argument for GSPO: the sequence
is the unit that was sampled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor


@dataclass(frozen=True)
class Mismatch:
    """Token means over the response; ``masked`` is the share MIS drops (0 for TIS and off)."""

    kl: float
    """k3 estimate of KL(pi_trainer || pi_engine): 0 when they agree."""
    ratio_mean: float
    ratio_max: float
    masked: float


def mismatch_weights(
    trainer_logprobs: Tensor,
    engine_logprobs: Tensor,
    mask: Tensor,
    mode: Literal["off", "tis", "mis"],
    level: Literal["token", "sequence"],
    cap: float,
) -> tuple[Tensor, Mismatch]:
    """Per-token weights ``[N, T]`` for the policy loss (no gradient), and the statistics."""
    log_ratio = (trainer_logprobs - engine_logprobs).detach() * mask
    if level == "sequence":
        log_ratio = log_ratio.sum(dim=-1, keepdim=True).expand_as(mask)
    ratio = torch.exp(log_ratio)
    if mode == "tis":
        weights = torch.clamp(ratio, max=cap)
    elif mode == "mis":
        weights = ((ratio <= cap) & (ratio >= 1.0 / cap)).to(mask.dtype)
    else:
        weights = torch.ones_like(ratio)
    token_log_ratio = (engine_logprobs - trainer_logprobs).detach()
    k3 = torch.exp(token_log_ratio) - token_log_ratio - 1.0
    tokens = mask.sum()
    dropped = ((1.0 - weights) * mask).sum() / tokens if mode == "mis" else torch.zeros(())
    stats = Mismatch(
        kl=float(((k3 * mask).sum() / tokens).item()),
        ratio_mean=float(((ratio * mask).sum() / tokens).item()),
        ratio_max=float(ratio.masked_fill(mask == 0, 0.0).max().item()),
        masked=float(dropped.item()),
    )
    return weights * mask, stats

"""GRPO's objective on one micro-batch, shared by the torch and Megatron backends.

The loss is -J of GRPO (Shao et al. 2024, arXiv:2402.03300, eq. 3): the clipped surrogate
(``miles.algo.clipped_policy_loss``) plus ``kl_coef`` times the KL estimate to the reference.
The backends differ only in how they get the logprobs (one model, or vocab-parallel logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from miles.algo import PolicyLossStats, clipped_policy_loss, kl_penalty, masked_aggregate
from miles.config import GRPOConfig
from miles.trainer.batch import TensorBatch


@dataclass(frozen=True)
class MicroObjective:
    loss: Tensor
    """-J: the clipped surrogate plus kl_coef * KL; backward gives the micro-batch gradient."""
    kl: float
    """The KL estimate to the reference; 0 without one (none is kept when kl_coef is 0)."""
    stats: PolicyLossStats
    engine_gap: float
    """Mean |trainer - engine| logprob per token: the train/inference mismatch."""


def grpo_objective(
    logprobs: Tensor, ref_logprobs: Tensor | None, micro: TensorBatch, grpo: GRPOConfig
) -> MicroObjective:
    # pi_old: within one optimizer step the policy has not moved yet, so the trainer's own
    # logprobs, detached, are exactly its pre-update policy (ratio 1, gradient A * grad log p)
    old = logprobs.detach() if grpo.old_logprobs == "trainer" else micro.old_logprobs
    gap = masked_aggregate((logprobs.detach() - micro.old_logprobs).abs(), micro.loss_mask, "token")
    loss, stats = clipped_policy_loss(
        logprobs,
        old,
        micro.advantages,
        micro.loss_mask,
        grpo.eps_low,
        grpo.eps_high,
        grpo.loss_aggregation,
    )
    kl = torch.zeros(())
    if ref_logprobs is not None:
        per_token_kl = kl_penalty(logprobs, ref_logprobs, grpo.kl_estimator)
        kl = masked_aggregate(per_token_kl, micro.loss_mask, grpo.loss_aggregation)
        loss = loss + grpo.kl_coef * kl
    return MicroObjective(loss, kl.item(), stats, gap.item())

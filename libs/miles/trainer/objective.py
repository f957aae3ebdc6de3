"""The configured algorithm's loss on one micro-batch, shared by the torch and Megatron backends.

``loss = aggregate(w * policy_loss) + kl_coef * aggregate(KL) - entropy_coef * aggregate(H)``:
the surrogate the algorithm names (``miles.algo.policy_loss``), weighted per token by the
train/inference correction ``w`` when one is on (``miles.algo.correction``), reduced by the
algorithm's aggregation, plus its KL term to the frozen reference and minus its entropy bonus.
The backends differ only in how they get the logprobs (one model, or vocab-parallel logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from miles.algo import (
    Mismatch,
    PolicyLossStats,
    aggregate,
    cispo,
    gspo,
    kl_estimate,
    mismatch_weights,
    ppo_clip,
)
from miles.config.algorithm import PolicyGradient
from miles.trainer.batch import TensorBatch

METRICS = (
    "loss",
    "kl",
    "entropy",
    "clip_frac",
    "ratio_mean",
    "engine_gap",
    "mismatch_kl",
    "mismatch_ratio_mean",
    "mismatch_ratio_max",
    "mismatch_masked",
)
"""What a micro-batch reports, in ``MicroObjective.values`` order. ``loss``, ``kl`` and
``entropy`` are weighted by the micro-batch's share of the batch, the rest by its token share,
except ``mismatch_ratio_max``, a maximum."""


@dataclass(frozen=True)
class MicroObjective:
    loss: Tensor
    """The micro-batch's loss; backward gives its gradient."""
    kl: float
    """The KL estimate to the reference; 0 without one (none is kept when kl_coef is 0)."""
    entropy: float
    """The policy's entropy on the response; 0 when entropy_coef is 0 (not computed)."""
    stats: PolicyLossStats
    mismatch: Mismatch
    engine_gap: float
    """Mean |trainer - engine| logprob per token: the train/inference mismatch."""

    def values(self) -> list[float]:
        """``METRICS`` in order, unweighted."""
        m = self.mismatch
        return [
            self.loss.item(),
            self.kl,
            self.entropy,
            self.stats.clip_fraction,
            self.stats.ratio_mean,
            self.engine_gap,
            m.kl,
            m.ratio_mean,
            m.ratio_max,
            m.masked,
        ]


MAX_METRICS = frozenset({"mismatch_ratio_max"})


def weighted_values(objective: MicroObjective, share: float, token_share: float) -> list[float]:
    """``METRICS`` of a micro-batch weighted so that summing over micro-batches (and ranks)
    gives the batch's value; a maximum stays as it is, to be combined with ``max``."""
    weights = {"loss": share, "kl": share, "entropy": share}
    return [
        value if name in MAX_METRICS else value * weights.get(name, token_share)
        for name, value in zip(METRICS, objective.values(), strict=True)
    ]


def combine(totals: list[float], values: list[float]) -> list[float]:
    """Add a micro-batch's ``weighted_values`` into ``totals`` (a maximum by ``max``)."""
    return [
        max(total, value) if name in MAX_METRICS else total + value
        for name, total, value in zip(METRICS, totals, values, strict=True)
    ]


def measured(totals: dict[str, float], algorithm: PolicyGradient) -> dict[str, float]:
    """The batch's ``METRICS`` without the entropy when none was computed (it reads 0)."""
    if algorithm.entropy_coef > 0:
        return totals
    return {key: value for key, value in totals.items() if key != "entropy"}


def pi_old(logprobs: Tensor, micro: TensorBatch, algorithm: PolicyGradient) -> Tensor:
    """pi_old of the ratio: the engine's logprobs, or the trainer's before the batch's first
    update. With one update per batch the policy has not moved yet, so the trainer's own
    logprobs, detached, are exactly that (ratio 1, gradient A * grad log p); with several, the
    backend computed them in a forward pass before the first (``micro.trainer_logprobs``)."""
    if algorithm.old_logprobs != "trainer":  # "auto" is resolved before a backend sees it
        return micro.engine_logprobs
    if micro.trainer_logprobs is not None:
        return micro.trainer_logprobs
    return logprobs.detach()


def policy_objective(
    logprobs: Tensor,
    ref_logprobs: Tensor | None,
    entropy: Tensor | None,
    micro: TensorBatch,
    algorithm: PolicyGradient,
) -> MicroObjective:
    mask, norm = micro.loss_mask, algorithm.norm_tokens or 1
    old = pi_old(logprobs, micro, algorithm)
    clip = (algorithm.eps_low, algorithm.eps_high)
    if algorithm.policy_loss == "gspo":
        per_token, stats = gspo(logprobs, old, micro.advantages, mask, *clip)
    elif algorithm.policy_loss == "cispo":
        per_token, stats = cispo(logprobs, old, micro.advantages, mask, *clip)
    else:
        per_token, stats = ppo_clip(
            logprobs, old, micro.advantages, mask, *clip, dual_clip=algorithm.dual_clip
        )
    # The trainer's pre-update policy against the engine that sampled: the same tokens, two
    # numerical paths. With stale data pi_old is the engine's, and the correction is refused.
    trainer_old = old if algorithm.old_logprobs == "trainer" else logprobs.detach()
    correction = algorithm.correction
    weights, mismatch = mismatch_weights(
        trainer_old, micro.engine_logprobs, mask, correction.mode, correction.level, correction.cap
    )
    if correction.mode != "off":
        per_token = per_token * weights
    loss = aggregate(per_token, mask, algorithm.aggregation, norm)
    kl = torch.zeros(())
    if ref_logprobs is not None:
        per_token_kl = kl_estimate(logprobs, ref_logprobs, algorithm.kl_estimator)
        kl = aggregate(per_token_kl, mask, algorithm.aggregation, norm)
        loss = loss + algorithm.kl_coef * kl
    mean_entropy = torch.zeros(())
    if entropy is not None:
        mean_entropy = aggregate(entropy, mask, algorithm.aggregation, norm)
        loss = loss - algorithm.entropy_coef * mean_entropy
    gap = aggregate((logprobs.detach() - micro.engine_logprobs).abs(), mask, "token_mean")
    return MicroObjective(loss, kl.item(), mean_entropy.item(), stats, mismatch, gap.item())

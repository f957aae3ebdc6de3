"""Per-token estimates of KL(pi_theta || pi_ref) from tokens sampled from pi_theta, and the
entropy bonus.

Schulman, "Approximating KL Divergence" (2020, joschu.net/blog/kl-approx.html), with
``r = pi_ref / pi_theta`` (``log_r = ref_logp - logp``):

* ``k1 = -log_r``: unbiased, high variance, negative on many tokens;
* ``k2 = (log_r)^2 / 2``: biased, low variance; its gradient is the true KL's gradient in
  expectation (the choice of REINFORCE++'s KL loss);
* ``k3 = (r - 1) - log_r``: unbiased, never negative, low variance (GRPO, arXiv:2402.03300, eq. 4);
* ``k3_clamped``: k3 with ``log_r`` clamped to ±20 and the result to ±10, verl's ``low_var_kl``,
  so one token whose probability collapsed cannot dominate a step.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3", "k3_clamped"]


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator) -> Tensor:
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.exp(log_ratio) - log_ratio - 1.0
    log_ratio = log_ratio.clamp(-20.0, 20.0)
    return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(-10.0, 10.0)


def kl_penalized_rewards(
    rewards: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    coef: float,
    estimator: KLEstimator,
) -> Tensor:
    """KL as a per-token reward penalty instead of a loss term: ``r_t - coef * KL_t`` on every
    response token (Ziegler et al. 2019, arXiv:1909.08593, eq. 2; Ouyang et al. 2022,
    arXiv:2203.02155, eq. 2; REINFORCE++, arXiv:2501.03262, sec. 3.1). ``rewards`` ``[N, T]``
    are the per-token rewards (the outcome on the last token), ``logprobs`` those of the policy
    that sampled (pi_old, a constant). The penalty then flows through the advantage estimator
    (GAE, or REINFORCE++'s returns) rather than through the loss's gradient."""
    return (rewards - coef * kl_estimate(logprobs, ref_logprobs, estimator)) * mask


def entropy_from_logits(logits: Tensor) -> Tensor:
    """``H = -sum_v p_v log p_v = logsumexp(x) - sum_v p_v x_v`` per position, from ``[..., V]``
    logits. Subtracted from the loss times ``entropy_coef`` (Williams and Peng 1991; Mnih et
    al. 2016, arXiv:1602.01783, sec. 4), it keeps the policy from collapsing early."""
    probabilities = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probabilities * logits).sum(dim=-1)

"""``miles.algo`` against verl 0.9.1's ``core_algos``, on the same random batches.

The components are written from the papers, and their unit tests check them against numbers
worked out by hand; a hand computation can share a convention with the code it checks (Bessel or
population std, which tokens a mean runs over, where a stop-gradient sits). verl is the
implementation most published recipes ran with, so agreeing with it on random inputs, to 1e-6,
pins those conventions. Values and, for the policy losses, gradients are compared.

verl works per token: the outcome score sits on the last response token of ``[N, T]``
token-level rewards, groups are an index array, and advantages come back ``[N, T]`` (times the
mask). miles has one advantage per sequence; it is broadcast over the mask here. Inputs are
float64, with log-ratios within ±0.5 (±1.5 where the dual clip must bite) so that verl's
numerical clamps (log-ratio to ±20, KL to ±10) do not, except in the test that checks them.
"""

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import verl.trainer.ppo.core_algos as core_algos
import verl.utils.torch_functional as verl_F
from torch import Tensor
from verl.trainer.config import AlgoConfig
from verl.workers.config import ActorConfig

from miles.algo import (
    PolicyLossStats,
    aggregate,
    batch_whitened,
    cispo,
    entropy_from_logits,
    gae,
    group_normalized,
    gspo,
    kl_estimate,
    kl_penalized_rewards,
    leave_one_out,
    ppo_clip,
    reinforce_pp_returns,
)

pytestmark = pytest.mark.reference

torch.set_num_threads(1)

GROUPS, G = 4, 4  # four prompts, four samples each
N, T = GROUPS * G, 12
INDEX = np.array([f"prompt-{i // G}" for i in range(N)], dtype=object)  # verl's uid per sample
EPS_LOW, EPS_HIGH, DUAL_CLIP = 0.2, 0.28, 3.0
ACTOR = ActorConfig(
    strategy="fsdp",
    rollout_n=G,
    ppo_micro_batch_size_per_gpu=N,
    clip_ratio=EPS_LOW,
    clip_ratio_low=EPS_LOW,
    clip_ratio_high=EPS_HIGH,
    clip_ratio_c=DUAL_CLIP,
)
MODES = {
    "token_mean": "token-mean",
    "seq_mean_token_mean": "seq-mean-token-mean",
    "seq_mean_token_sum": "seq-mean-token-sum",
    "seq_mean_token_sum_norm": "seq-mean-token-sum-norm",
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _close(ours: Tensor, theirs: Tensor) -> None:
    torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=1e-6, rtol=1e-6)


def _mask() -> Tensor:
    """Response masks with gaps (tool tokens) and padding, and at least one token per row."""
    mask = (torch.rand(N, T) < 0.7).to(torch.float64)
    mask[torch.arange(N), torch.randint(0, T, (N,))] = 1.0
    return mask


def _scores() -> Tensor:
    """One score per sample; the first group all equal (zero variance)."""
    scores = torch.randn(N, dtype=torch.float64)
    scores[:G] = 1.0
    return scores


def _on_last_token(scores: Tensor, mask: Tensor) -> Tensor:
    """verl's token-level rewards: each score on its sequence's last response token."""
    last = mask.cumsum(dim=-1).argmax(dim=-1)  # where the running count first reaches its total
    rewards = torch.zeros_like(mask)
    rewards[torch.arange(N), last] = scores
    return rewards


def _broadcast(advantages: Tensor, mask: Tensor) -> Tensor:
    return advantages[:, None] * mask


# --- advantages ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("std", "norm_adv_by_std"), [("bessel", True), ("none", False)])
def test_group_normalized_is_verls_grpo(std: str, norm_adv_by_std: bool) -> None:
    # GRPO (arXiv:2402.03300, sec. 4.1.2): A_i = (r_i - mean(r)) / (std(r) + eps), verl's std is
    # torch.std (Bessel); without the division it is Dr.GRPO (arXiv:2503.20783, sec. 3.1).
    mask, scores = _mask(), _scores()
    theirs, _ = core_algos.compute_grpo_outcome_advantage(
        _on_last_token(scores, mask),
        mask,
        INDEX,
        epsilon=1e-6,
        norm_adv_by_std_in_grpo=norm_adv_by_std,
    )
    ours = group_normalized(scores.view(GROUPS, G), std, eps=1e-6).reshape(N)
    _close(_broadcast(ours, mask), theirs * mask)


def test_leave_one_out_is_verls_rloo() -> None:
    # RLOO (arXiv:2402.14740, eq. 6): A_i = r_i - 1/(G-1) sum_{j != i} r_j
    mask, scores = _mask(), _scores()
    theirs, _ = core_algos.compute_rloo_outcome_advantage(_on_last_token(scores, mask), mask, INDEX)
    ours = leave_one_out(scores.view(GROUPS, G)).reshape(N)
    _close(_broadcast(ours, mask), theirs * mask)


def test_batch_whitened_with_group_means_is_verls_reinforce_pp_baseline() -> None:
    # REINFORCE++-baseline (arXiv:2501.03262, sec. 3.2): r - mean of the group, then whitened over
    # the batch's tokens, A = (x - mu) / sqrt(var + 1e-8) with Bessel's correction.
    mask, scores = _mask(), _scores()
    theirs, _ = core_algos.compute_reinforce_plus_plus_baseline_outcome_advantage(
        _on_last_token(scores, mask), mask, INDEX
    )
    means = scores.view(GROUPS, G).mean(dim=-1).repeat_interleave(G)
    ours = batch_whitened(scores, mask.sum(dim=-1), means)
    _close(_broadcast(ours, mask), theirs * mask)


def test_batch_whitened_without_group_means_is_verls_reinforce_pp() -> None:
    # verl's REINFORCE++ whitens the discounted returns G_t = sum_{k >= t} gamma^(k-t) r_k; with
    # gamma = 1 and the score on the last response token, every response token's return is the
    # score, so its advantage is the sequence's whitened score.
    mask, scores = _mask(), _scores()
    theirs, returns = core_algos.compute_reinforce_plus_plus_outcome_advantage(
        _on_last_token(scores, mask), mask, config=AlgoConfig(gamma=1.0)
    )
    _close(_broadcast(scores, mask), returns * mask)
    ours = batch_whitened(scores, mask.sum(dim=-1), None)
    _close(_broadcast(ours, mask), theirs * mask)


def test_gae_is_verls_before_whitening() -> None:
    # GAE (arXiv:1506.02438, eq. 16): delta_t = r_t + gamma V_{t+1} - V_t,
    # A_t = delta_t + gamma lam A_{t+1}, skipping masked tokens. verl whitens the advantages
    # before returning them (ours are raw), and its returns A + V are the raw ones.
    mask = _mask()
    rewards = torch.randn(N, T, dtype=torch.float64)  # rewards on masked tokens must be ignored
    values = torch.randn(N, T, dtype=torch.float64)
    theirs, their_returns = core_algos.compute_gae_advantage_return(
        rewards, values, mask, gamma=0.99, lam=0.95
    )
    ours, our_returns = gae(rewards, values, mask, 0.99, 0.95)
    _close(our_returns, their_returns * mask)
    _close(verl_F.masked_whiten(ours, mask) * mask, theirs * mask)


# --- aggregation --------------------------------------------------------------------------------


@pytest.mark.parametrize("empty_row", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_aggregate_is_verls_agg_loss(mode: str, empty_row: bool) -> None:
    # token-mean: DAPO eq. 12; seq-mean-token-mean: GRPO eq. 3; seq-mean-token-sum: RLOO eq. 6;
    # seq-mean-token-sum-norm: Dr.GRPO sec. 3.1 (divided by a constant, here 20 tokens)
    values, mask = torch.randn(N, T, dtype=torch.float64), _mask()
    if empty_row:
        mask[3] = 0.0  # a sequence with no token counts as no sequence, on both sides
    ours = aggregate(values, mask, mode, norm_tokens=20)  # type: ignore[arg-type]
    theirs = core_algos.agg_loss(values, mask, MODES[mode], loss_scale_factor=20)
    _close(ours, theirs)


# --- policy losses ------------------------------------------------------------------------------


PolicyBatch = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def _policy_batch(log_ratios: Tensor) -> PolicyBatch:
    """Two leaf copies of the same logprobs (one per side, for their gradients), pi_old,
    per-sequence advantages and a mask."""
    old = -3.0 * torch.rand(N, T, dtype=torch.float64)
    logprobs = (old + log_ratios).detach()
    return (
        logprobs.clone().requires_grad_(),
        logprobs.clone().requires_grad_(),
        old,
        torch.randn(N, dtype=torch.float64),
        _mask(),
    )


def _uniform(low: float, high: float, *shape: int) -> Tensor:
    return low + (high - low) * torch.rand(*shape, dtype=torch.float64)


def _norm_tokens(mode: str) -> int:
    # verl's seq-mean-token-sum-norm divides by the horizon T when no loss_scale_factor is set
    return T if mode == "seq_mean_token_sum_norm" else 1


def _same_as_verl(
    verl_loss: Callable[..., tuple[Tensor, dict[str, Any]]],
    batch: PolicyBatch,
    per_token: Tensor,
    stats: PolicyLossStats,
    mode: str,
) -> dict[str, Any]:
    """Our per-token loss, aggregated by ``mode``, against verl's policy loss on the same
    batch: the value, the gradient of the logprobs and the clip fraction. verl's metrics."""
    ours_lp, their_lp, old, advantages, mask = batch
    ours = aggregate(per_token, mask, mode, _norm_tokens(mode))  # type: ignore[arg-type]
    theirs, metrics = verl_loss(
        old, their_lp, advantages[:, None].expand(N, T), mask, MODES[mode], ACTOR
    )
    _close(ours, theirs)
    ours.backward()
    theirs.backward()
    _close(ours_lp.grad, their_lp.grad)
    assert stats.clip_fraction == pytest.approx(metrics["actor/pg_clipfrac"], abs=1e-6)
    return metrics


@pytest.mark.parametrize("mode", MODES)
def test_ppo_clip_with_dual_clip_is_verls_vanilla(mode: str) -> None:
    # PPO (arXiv:1707.06347, eq. 7) with DAPO's clip-higher (eps_low 0.2, eps_high 0.28) and the
    # dual clip c = 3 (arXiv:1912.09729, eq. 6): ratios up to e^1.5 = 4.5 so that c bites.
    batch = _policy_batch(_uniform(-1.5, 1.5, N, T))
    ours_lp, _, old, advantages, mask = batch
    per_token, stats = ppo_clip(ours_lp, old, advantages, mask, EPS_LOW, EPS_HIGH, DUAL_CLIP)
    metrics = _same_as_verl(core_algos.compute_policy_loss_vanilla, batch, per_token, stats, mode)
    assert metrics["actor/pg_clipfrac_lower"] > 0  # the dual clip bit on some tokens


@pytest.mark.parametrize("mode", MODES)
def test_gspo_is_verls_gspo(mode: str) -> None:
    # GSPO (arXiv:2507.18071, eq. 7, token form eq. 13): s_i = exp(1/|y_i| sum_t log r_t), the
    # value of every token's ratio, with the gradient of the token's own logprob. A per-sequence
    # offset within ±0.3 (plus ±0.2 per token) puts some s_i outside [0.8, 1.28].
    log_ratios = _uniform(-0.3, 0.3, N, 1) + _uniform(-0.2, 0.2, N, T)
    batch = _policy_batch(log_ratios)
    ours_lp, _, old, advantages, mask = batch
    per_token, stats = gspo(ours_lp, old, advantages, mask, EPS_LOW, EPS_HIGH)
    assert stats.clip_fraction > 0
    _same_as_verl(core_algos.compute_policy_loss_gspo, batch, per_token, stats, mode)


@pytest.mark.parametrize("mode", MODES)
def test_cispo_is_verls_cispo(mode: str) -> None:
    # CISPO (arXiv:2506.13585, eq. 4-5): loss_t = -sg(clip(r_t, 1 - eps_low, 1 + eps_high)) A logp_t
    batch = _policy_batch(_uniform(-0.5, 0.5, N, T))
    ours_lp, _, old, advantages, mask = batch
    per_token, stats = cispo(ours_lp, old, advantages, mask, EPS_LOW, EPS_HIGH)
    assert stats.clip_fraction > 0
    _same_as_verl(core_algos.compute_policy_loss_cispo, batch, per_token, stats, mode)


# --- KL and entropy -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [("k1", "k1"), ("k2", "k2"), ("k3", "low_var_kl"), ("k3_clamped", "low_var_kl")],
)
def test_kl_estimate_is_verls_kl_penalty(ours: str, theirs: str) -> None:
    # Schulman 2020, log_r = ref - logp: k1 = -log_r, k2 = log_r^2 / 2, k3 = e^log_r - log_r - 1;
    # within ±0.5 verl's clamps do not bite, so k3 and its clamped form agree with low_var_kl
    logprobs = -3.0 * torch.rand(N, T, dtype=torch.float64)
    ref_logprobs = logprobs + _uniform(-0.5, 0.5, N, T)
    _close(
        kl_estimate(logprobs, ref_logprobs, ours),  # type: ignore[arg-type]
        core_algos.kl_penalty(logprobs, ref_logprobs, theirs),
    )


def test_k3_clamped_is_verls_low_var_kl_where_the_clamps_bite() -> None:
    # log_r within ±40: clamped to ±20, and the estimate to at most 10
    logprobs = -3.0 * torch.rand(N, T, dtype=torch.float64)
    ref_logprobs = logprobs + _uniform(-40.0, 40.0, N, T)
    ours = kl_estimate(logprobs, ref_logprobs, "k3_clamped")
    assert (ours == 10.0).any()
    _close(ours, core_algos.kl_penalty(logprobs, ref_logprobs, "low_var_kl"))


def test_entropy_from_logits_is_verls() -> None:
    # H = -sum_v p_v log p_v = logsumexp(x) - sum_v p_v x_v
    logits = 3.0 * torch.randn(N, T, 50, dtype=torch.float64)
    _close(entropy_from_logits(logits), verl_F.entropy_from_logits(logits))


# --- KL as a reward penalty (PPO, REINFORCE++) --------------------------------------------------


def test_reinforce_pp_returns_are_verls_with_per_token_rewards() -> None:
    # REINFORCE++ with the KL in the reward: returns G_t over response tokens (observation
    # tokens skipped), whitened over the batch's tokens; gamma < 1 so the discount shows.
    mask = _mask()
    rewards = torch.randn(N, T, dtype=torch.float64)  # rewards on masked tokens must be ignored
    theirs, _ = core_algos.compute_reinforce_plus_plus_outcome_advantage(
        rewards * mask, mask, config=AlgoConfig(gamma=0.9)
    )
    _close(reinforce_pp_returns(rewards * mask, mask, gamma=0.9), theirs * mask)


@pytest.mark.parametrize(("ours", "theirs"), [("k1", "k1"), ("k2", "k2"), ("k3", "k3")])
def test_kl_penalized_rewards_are_verls_apply_kl_penalty(ours: str, theirs: str) -> None:
    # verl's apply_kl_penalty: token_level_rewards = token_level_scores - beta * kl_penalty(old
    # logprob, ref logprob) times the response mask.
    mask, scores = _mask(), _scores()
    logprobs = -torch.rand(N, T, dtype=torch.float64)
    ref = logprobs + 0.5 * (torch.rand(N, T, dtype=torch.float64) - 0.5)
    beta = 0.05
    expected = (
        _on_last_token(scores, mask) - beta * core_algos.kl_penalty(logprobs, ref, theirs)
    ) * mask
    ours_rewards = kl_penalized_rewards(
        _on_last_token(scores, mask),
        logprobs,
        ref,
        mask,
        beta,
        ours,  # type: ignore[arg-type]
    )
    _close(ours_rewards, expected)

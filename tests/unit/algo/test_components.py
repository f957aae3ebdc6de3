"""The RL components of ``miles.algo`` against numbers computed by hand (the arithmetic is in the
comments) and against their paper equations written out in the test, independently of the
implementation, in float64.
"""

import math

import pytest
import torch

from miles.algo import (
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
    mismatch_weights,
    overlong_penalty,
    ppo_clip,
    reinforce_pp_returns,
)

torch.set_num_threads(1)


def _t(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# --- group_normalized ---------------------------------------------------------------------------


def test_advantages_use_population_std() -> None:
    # [1, 0, 0, 1]: mean 0.5, population std sqrt(4 * 0.25 / 4) = 0.5 -> ±0.5 / (0.5 + eps)
    advantages = group_normalized(_t([[1, 0, 0, 1]]), std="population", eps=1e-6)
    a = 0.5 / 0.500001
    assert advantages[0].tolist() == pytest.approx([a, -a, -a, a], abs=1e-12)


def test_advantages_per_group_rows() -> None:
    # row 0: [3, 0, 0]: mean 1, centred [2, -1, -1], var (4 + 1 + 1) / 3 = 2, std sqrt(2)
    #        -> [2 / 1.41421356, -1 / 1.41421356, ...] = [1.41421356, -0.70710678, -0.70710678]
    # row 1: [5, 7, 9]: mean 7, centred [-2, 0, 2], var 8 / 3, std 1.63299316
    #        -> [-2 / 1.63299316, 0, 2 / 1.63299316] = [-1.22474487, 0, 1.22474487]
    advantages = group_normalized(_t([[3, 0, 0], [5, 7, 9]]), std="population", eps=0.0)
    expected = [[1.41421356, -0.70710678, -0.70710678], [-1.22474487, 0.0, 1.22474487]]
    assert advantages.tolist()[0] == pytest.approx(expected[0], abs=1e-8)
    assert advantages.tolist()[1] == pytest.approx(expected[1], abs=1e-8)


def test_bessel_std_divides_by_g_minus_one() -> None:
    # GRPO as verl and TRL compute it (torch.std): var = sum (r - mean)^2 / (G - 1).
    # row 0: [3, 0, 0]: centred [2, -1, -1], var (4 + 1 + 1) / 2 = 3, std sqrt(3) = 1.73205081
    #        -> [2 / 1.73205081, -1 / 1.73205081, ...] = [1.15470054, -0.57735027, -0.57735027]
    # row 1: [5, 7, 9]: centred [-2, 0, 2], var 8 / 2 = 4, std 2 -> [-1, 0, 1]
    advantages = group_normalized(_t([[3, 0, 0], [5, 7, 9]]), std="bessel", eps=0.0)
    assert advantages.tolist()[0] == pytest.approx([1.15470054, -0.57735027, -0.57735027], abs=1e-8)
    assert advantages.tolist()[1] == pytest.approx([-1.0, 0.0, 1.0], abs=1e-12)


def test_bessel_is_population_shrunk_by_sqrt_g_minus_one_over_g() -> None:
    # std_bessel = std_population * sqrt(G / (G - 1)), so A_bessel = A_population * sqrt((G-1)/G)
    rewards = _t([[0.3, 1.0, -2.0, 0.5, 0.0]])
    population = group_normalized(rewards, std="population", eps=0.0)
    bessel = group_normalized(rewards, std="bessel", eps=0.0)
    torch.testing.assert_close(bessel, population * math.sqrt(4 / 5), atol=1e-12, rtol=0)


def test_dr_grpo_only_centres() -> None:
    advantages = group_normalized(_t([[1, 0, 0, 1], [3, 0, 0, 1]]), std="none")
    # row 1: mean 1 -> [2, -1, -1, 0]
    assert advantages.tolist() == [[0.5, -0.5, -0.5, 0.5], [2.0, -1.0, -1.0, 0.0]]


@pytest.mark.parametrize("std", ["population", "bessel", "none"])
def test_zero_variance_group_gives_zero_not_nan(std: str) -> None:
    advantages = group_normalized(
        torch.tensor([[2.0, 2.0, 2.0, 2.0], [1.0, 0.0, 1.0, 0.0]]),
        std=std,
    )
    assert not torch.isnan(advantages).any()
    assert advantages[0].tolist() == [0.0, 0.0, 0.0, 0.0]


# --- leave_one_out ------------------------------------------------------------------------------


def test_leave_one_out_by_hand() -> None:
    # RLOO (arXiv:2402.14740, eq. 6): A_i = r_i - 1/(G-1) sum_{j != i} r_j
    # [1, 0, 0, 1]: 1 - (0 + 0 + 1) / 3 = 2/3;  0 - (1 + 0 + 1) / 3 = -2/3
    # [3, 0, 0]:    3 - 0 = 3;  0 - (3 + 0) / 2 = -1.5
    # [5, 7, 9]:    5 - 8 = -3;  7 - 7 = 0;  9 - 6 = 3
    assert leave_one_out(_t([[1, 0, 0, 1]]))[0].tolist() == pytest.approx(
        [2 / 3, -2 / 3, -2 / 3, 2 / 3], abs=1e-12
    )
    advantages = leave_one_out(_t([[3, 0, 0], [5, 7, 9]]))
    assert advantages.tolist()[0] == pytest.approx([3.0, -1.5, -1.5], abs=1e-12)
    assert advantages.tolist()[1] == pytest.approx([-3.0, 0.0, 3.0], abs=1e-12)


def test_leave_one_out_matches_the_sum_over_the_others() -> None:
    rewards = torch.rand(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = [
        [
            row[i] - sum(row[j] for j in range(len(row)) if j != i) / (len(row) - 1)
            for i in range(len(row))
        ]
        for row in rewards.tolist()
    ]
    torch.testing.assert_close(leave_one_out(rewards), _t(expected), atol=1e-12, rtol=0)


# --- batch_whitened -----------------------------------------------------------------------------
# REINFORCE++ (arXiv:2501.03262, sec. 3.2): A = (r - mu) / sqrt(var + 1e-8), with mu and var over
# the batch's tokens (each token carries its sequence's reward) and Bessel's correction over the
# token count: var = sum_tokens (r - mu)^2 / (n_tokens - 1).


def test_batch_whitened_without_group_means() -> None:
    # rewards [1, 0, 2], lengths [2, 1, 1]: the tokens carry [1, 1, 0, 2]
    # mu = 4 / 4 = 1;  sum (r - mu)^2 = 0 + 0 + 1 + 1 = 2;  var = 2 / (4 - 1) = 2/3
    # A = (r - 1) / sqrt(2/3 + 1e-8) = [0, -1.22474487, 1.22474487]
    advantages = batch_whitened(_t([1, 0, 2]), torch.tensor([2, 1, 1]), None)
    scale = 1 / math.sqrt(2 / 3 + 1e-8)
    assert advantages.tolist() == pytest.approx([0.0, -scale, scale], abs=1e-8)
    assert scale == pytest.approx(1.22474487, abs=1e-8)


def test_batch_whitened_subtracts_group_means_first() -> None:
    # rewards [1, 0 | 2, 4] in two groups, means [0.5, 0.5, 3, 3]: centred [0.5, -0.5, -1, 1]
    # lengths [1, 3, 2, 2]: 8 tokens, sum 0.5 - 1.5 - 2 + 2 = -1, mu = -1/8 = -0.125
    # deviations [0.625, -0.375, -0.875, 1.125], squared [0.390625, 0.140625, 0.765625, 1.265625]
    # token-weighted: 0.390625 + 3 * 0.140625 + 2 * 0.765625 + 2 * 1.265625 = 4.875
    # var = 4.875 / 7 = 0.69642857, std 0.83452296
    # A = [0.74893086, -0.44935852, -1.04850321, 1.34807555]
    advantages = batch_whitened(_t([1, 0, 2, 4]), torch.tensor([1, 3, 2, 2]), _t([0.5, 0.5, 3, 3]))
    std = math.sqrt(4.875 / 7 + 1e-8)
    expected = [0.625 / std, -0.375 / std, -0.875 / std, 1.125 / std]
    assert advantages.tolist() == pytest.approx(expected, abs=1e-8)
    assert expected == pytest.approx([0.74893086, -0.44935852, -1.04850321, 1.34807555], abs=1e-7)


def test_batch_whitened_tokens_have_zero_mean_and_unit_bessel_variance() -> None:
    generator = torch.Generator().manual_seed(1)
    rewards = torch.rand(10, generator=generator, dtype=torch.float64)
    lengths = torch.randint(1, 9, (10,), generator=generator)
    tokens = torch.repeat_interleave(batch_whitened(rewards, lengths, None), lengths)
    # zero and one up to the 1e-8 guards in the denominators
    assert tokens.mean().item() == pytest.approx(0.0, abs=1e-8)
    assert tokens.var(correction=1).item() == pytest.approx(1.0, abs=1e-6)


# --- gae ----------------------------------------------------------------------------------------
# GAE (arXiv:1506.02438, eq. 16): delta_t = r_t + gamma V_{t+1} - V_t,
# A_t = delta_t + gamma lam A_{t+1}; masked positions are skipped (the recursion goes from one
# kept token to the next kept token) and report 0.


def test_gae_by_hand() -> None:
    # gamma 0.9, lam 0.8 (gamma lam = 0.72), rewards [0, 0, 1], values [0.5, 0.6, 0.7]
    # t=2: delta = 1 + 0 - 0.7 = 0.3;          A_2 = 0.3
    # t=1: delta = 0 + 0.9 * 0.7 - 0.6 = 0.03; A_1 = 0.03 + 0.72 * 0.3 = 0.246
    # t=0: delta = 0 + 0.9 * 0.6 - 0.5 = 0.04; A_0 = 0.04 + 0.72 * 0.246 = 0.21712
    # returns = A + V = [0.71712, 0.846, 1.0]
    advantages, returns = gae(_t([[0, 0, 1]]), _t([[0.5, 0.6, 0.7]]), _t([[1, 1, 1]]), 0.9, 0.8)
    assert advantages[0].tolist() == pytest.approx([0.21712, 0.246, 0.3], abs=1e-12)
    assert returns[0].tolist() == pytest.approx([0.71712, 0.846, 1.0], abs=1e-12)


def test_gae_skips_a_masked_token() -> None:
    # mask [1, 0, 1]: the middle token (a tool's output) is skipped, reward and value alike
    # t=2: A_2 = 0.3 as above;  t=1: masked, reports 0, carries V_next = 0.7 and A_next = 0.3
    # t=0: delta = 0 + 0.9 * 0.7 - 0.5 = 0.13; A_0 = 0.13 + 0.72 * 0.3 = 0.346
    advantages, returns = gae(_t([[0, 5, 1]]), _t([[0.5, 0.6, 0.7]]), _t([[1, 0, 1]]), 0.9, 0.8)
    assert advantages[0].tolist() == pytest.approx([0.346, 0.0, 0.3], abs=1e-12)
    assert returns[0].tolist() == pytest.approx([0.846, 0.0, 1.0], abs=1e-12)


def _gae_loop(rewards: list, values: list, mask: list, gamma: float, lam: float) -> tuple:
    advantages = [[0.0] * len(row) for row in rewards]
    returns = [[0.0] * len(row) for row in rewards]
    for i in range(len(rewards)):
        next_value, next_advantage = 0.0, 0.0
        for t in reversed(range(len(rewards[i]))):
            if not mask[i][t]:
                continue
            delta = rewards[i][t] + gamma * next_value - values[i][t]
            next_advantage = delta + gamma * lam * next_advantage
            next_value = values[i][t]
            advantages[i][t] = next_advantage
            returns[i][t] = next_advantage + values[i][t]
    return advantages, returns


def test_gae_matches_the_recursion_on_random_inputs() -> None:
    generator = torch.Generator().manual_seed(2)
    rewards = torch.randn(5, 9, generator=generator, dtype=torch.float64)
    values = torch.randn(5, 9, generator=generator, dtype=torch.float64)
    mask = (torch.rand(5, 9, generator=generator) < 0.7).to(torch.float64)
    advantages, returns = gae(rewards, values, mask, 0.95, 0.9)
    expected = _gae_loop(rewards.tolist(), values.tolist(), mask.tolist(), 0.95, 0.9)
    torch.testing.assert_close(advantages, _t(expected[0]), atol=1e-12, rtol=0)
    torch.testing.assert_close(returns, _t(expected[1]), atol=1e-12, rtol=0)


# --- ppo_clip + aggregate -----------------------------------------------------------------------
# Two sequences, three tokens each, with ratios [1.5, 0.5, 1.1]; eps_low 0.2, eps_high 0.3, so the
# clip range is [0.8, 1.3]. Sequence 0 has A = +2, sequence 1 has A = -1.
#   seq 0, r 1.5: min(3.0, 1.3 * 2 = 2.6) = 2.6  clipped    loss -2.6
#   seq 0, r 0.5: min(1.0, 0.8 * 2 = 1.6) = 1.0  unclipped  loss -1.0
#   seq 0, r 1.1: min(2.2, 2.2)          = 2.2  inside     loss -2.2
#   seq 1, r 1.5: min(-1.5, -1.3)        = -1.5 unclipped  loss  1.5
#   seq 1, r 0.5: min(-0.5, -0.8)        = -0.8 clipped    loss  0.8
#   seq 1, r 1.1: min(-1.1, -1.1)        = -1.1 inside     loss  1.1
RATIOS = [[1.5, 0.5, 1.1], [1.5, 0.5, 1.1]]
ADVANTAGES = [2.0, -1.0]
EPS_LOW, EPS_HIGH = 0.2, 0.3


def _policy_inputs(
    mask: list[list[float]], ratios: list[list[float]] = RATIOS
) -> tuple[torch.Tensor, ...]:
    old_logprobs = _t([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.5]])
    logprobs = (old_logprobs + torch.log(_t(ratios))).requires_grad_()
    return logprobs, old_logprobs, _t(ADVANTAGES), _t(mask)


def test_clipping_on_both_sides_token_aggregation() -> None:
    logprobs, old, advantages, mask = _policy_inputs([[1, 1, 1], [1, 1, 1]])
    per_token, stats = ppo_clip(logprobs, old, advantages, mask, EPS_LOW, EPS_HIGH)
    loss = aggregate(per_token, mask, "token_mean")
    # (-2.6 - 1.0 - 2.2 + 1.5 + 0.8 + 1.1) / 6 = -2.4 / 6
    assert loss.item() == pytest.approx(-0.4, abs=1e-12)
    assert per_token.tolist() == [
        pytest.approx([-2.6, -1.0, -2.2], abs=1e-12),
        pytest.approx([1.5, 0.8, 1.1], abs=1e-12),
    ]
    # clipped: seq 0 token 0 and seq 1 token 1 -> 2 of 6
    assert stats.clip_fraction == pytest.approx(1 / 3)
    # (1.5 + 0.5 + 1.1) * 2 / 6
    assert stats.ratio_mean == pytest.approx(3.1 / 3, abs=1e-12)


def test_aggregations_with_unequal_lengths() -> None:
    # sequence 1 keeps only its first token
    mask = [[1, 1, 1], [1, 0, 0]]
    logprobs, old, advantages, mask_t = _policy_inputs(mask)
    per_token, stats = ppo_clip(logprobs, old, advantages, mask_t, EPS_LOW, EPS_HIGH)
    token = aggregate(per_token, mask_t, "token_mean")
    sequence = aggregate(per_token, mask_t, "seq_mean_token_mean")
    # token: (-2.6 - 1.0 - 2.2 + 1.5) / 4 = -4.3 / 4
    assert token.item() == pytest.approx(-1.075, abs=1e-12)
    # sequence: mean(-5.8 / 3, 1.5 / 1) = (-5.8 + 4.5) / 6 = -1.3 / 6
    assert sequence.item() == pytest.approx(-1.3 / 6, abs=1e-12)
    # only seq 0 token 0 is clipped among the 4 kept tokens
    assert stats.clip_fraction == pytest.approx(0.25)


def test_gradient_flows_only_through_the_unclipped_term() -> None:
    logprobs, old, advantages, mask = _policy_inputs([[1, 1, 1], [1, 1, 0]])
    per_token, _ = ppo_clip(logprobs, old, advantages, mask, EPS_LOW, EPS_HIGH)
    aggregate(per_token, mask, "token_mean").backward()
    # d loss_t / d logp_t = -A * r / n_tokens where the unclipped term is the min, else 0;
    # n_tokens = 5 and masked positions get nothing.
    expected = [
        [0.0, -2.0 * 0.5 / 5, -2.0 * 1.1 / 5],
        [1.0 * 1.5 / 5, 0.0, 0.0],
    ]
    assert logprobs.grad is not None
    for row, expected_row in zip(logprobs.grad.tolist(), expected, strict=True):
        assert row == pytest.approx(expected_row, abs=1e-12)


def test_on_policy_ratio_is_one_and_loss_is_minus_mean_advantage() -> None:
    old = _t([[-1.0, -2.0], [-0.5, -0.7]])
    mask = _t([[1, 1], [1, 0]])
    per_token, stats = ppo_clip(old.clone(), old, _t([1.0, -3.0]), mask, 0.2, 0.28)
    # -(1 + 1 - 3) / 3
    assert aggregate(per_token, mask, "token_mean").item() == pytest.approx(1 / 3, abs=1e-12)
    assert stats.ratio_mean == 1.0
    assert stats.clip_fraction == 0.0


def test_dual_clip_bounds_the_loss_of_negative_advantages() -> None:
    # Dual-clip PPO (arXiv:1912.09729, eq. 6): for A < 0, loss = min(max(-rA, -clip(r)A), -cA).
    # ratios [4.0, 2.5, 0.5], clip range [0.8, 1.3], c = 3
    #   seq 0 (A = +2), untouched by the dual clip:
    #     r 4.0: -min(8.0, 2.6) = -2.6;  r 2.5: -min(5.0, 2.6) = -2.6;  r 0.5: -min(1.0, 1.6) = -1.0
    #   seq 1 (A = -1):
    #     r 4.0: max(4.0, 1.3) = 4.0, min(4.0, 3) = 3   dual-clipped: constant, no gradient
    #     r 2.5: max(2.5, 1.3) = 2.5, min(2.5, 3) = 2.5 gradient d(-rA)/dlogp = r = 2.5
    #     r 0.5: max(0.5, 0.8) = 0.8, min(0.8, 3) = 0.8 clipped: no gradient
    ratios = [[4.0, 2.5, 0.5], [4.0, 2.5, 0.5]]
    logprobs, old, advantages, mask = _policy_inputs([[1, 1, 1], [1, 1, 1]], ratios)
    per_token, _ = ppo_clip(logprobs, old, advantages, mask, EPS_LOW, EPS_HIGH, dual_clip=3.0)
    assert per_token.tolist() == [
        pytest.approx([-2.6, -2.6, -1.0], abs=1e-12),
        pytest.approx([3.0, 2.5, 0.8], abs=1e-12),
    ]
    (per_token * mask).sum().backward()
    assert logprobs.grad is not None
    # seq 0 token 2: d(-r * 2)/dlogp = -2 * 0.5 = -1.0, the others clipped
    assert logprobs.grad.tolist() == [
        pytest.approx([0.0, 0.0, -1.0], abs=1e-12),
        pytest.approx([0.0, 2.5, 0.0], abs=1e-12),
    ]
    # without the dual clip the first token of seq 1 keeps its loss of 4
    plain, _ = ppo_clip(logprobs, old, advantages, mask, EPS_LOW, EPS_HIGH)
    assert plain[1, 0].item() == pytest.approx(4.0, abs=1e-12)


# --- aggregate ----------------------------------------------------------------------------------


def test_sequence_sum_aggregations() -> None:
    values = _t([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    # row 2 has no token: it is no sequence
    mask = _t([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    # seq_mean_token_sum (RLOO, eq. 6): mean(1 + 2, 4) = 3.5
    assert aggregate(values, mask, "seq_mean_token_sum").item() == pytest.approx(3.5, abs=1e-12)
    # seq_mean_token_sum_norm (Dr.GRPO, sec. 3.1): 3.5 / norm_tokens = 3.5 / 4 = 0.875
    assert aggregate(values, mask, "seq_mean_token_sum_norm", norm_tokens=4).item() == (
        pytest.approx(0.875, abs=1e-12)
    )


# --- gspo ---------------------------------------------------------------------------------------
# GSPO (arXiv:2507.18071, eq. 5-7): s_i = (prod_t r_t)^(1/|y_i|), the geometric mean of the token
# ratios, and J = 1/N sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i).
# Four sequences, clip range [0.8, 1.28]; the last column of row 0 is masked (ratio 5, ignored).
GSPO_RATIOS = [
    [1.5, 1.2, 0.9, 5.0],  # A = +1: s = 1.62^(1/3) = 1.174460 inside
    [2.0, 1.8, 1.6, 1.4],  # A = +1: s = 8.064^(1/4) = 1.685146 clipped at 1.28
    [0.5, 0.6, 0.7, 0.8],  # A = -0.5: s = 0.168^(1/4) = 0.640217 clipped at 0.8
    [0.7, 1.1, 1.0, 0.9],  # A = -0.5: s = 0.693^(1/4) = 0.912396 inside
]
GSPO_MASK = [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]
GSPO_ADVANTAGES = [1.0, 1.0, -0.5, -0.5]


def _gspo_inputs() -> tuple[torch.Tensor, ...]:
    old = torch.log(
        _t([[0.3, 0.2, 0.1, 0.1], [0.4, 0.3, 0.5, 0.2], [0.9, 0.8, 0.7, 0.6], [0.5, 0.4, 0.3, 0.2]])
    )
    logprobs = (old + torch.log(_t(GSPO_RATIOS))).requires_grad_()
    return logprobs, old, _t(GSPO_ADVANTAGES), _t(GSPO_MASK)


def _sequence_ratios() -> list[float]:
    return [
        math.prod(r for r, m in zip(row, mask, strict=True) if m) ** (1 / sum(mask))
        for row, mask in zip(GSPO_RATIOS, GSPO_MASK, strict=True)
    ]


def test_gspo_value_is_the_clipped_geometric_mean_ratio() -> None:
    logprobs, old, advantages, mask = _gspo_inputs()
    per_token, stats = gspo(logprobs, old, advantages, mask, 0.2, 0.28)
    s = _sequence_ratios()
    assert s == pytest.approx([1.174460, 1.685146, 0.640217, 0.912396], abs=1e-6)
    for i, (s_i, a_i) in enumerate(zip(s, GSPO_ADVANTAGES, strict=True)):
        expected = -min(s_i * a_i, min(max(s_i, 0.8), 1.28) * a_i)
        for t in range(4):
            if GSPO_MASK[i][t]:
                assert per_token[i, t].item() == pytest.approx(expected, abs=1e-12)
    # rows 1 and 2 are clipped: 8 of 15 tokens
    assert stats.clip_fraction == pytest.approx(8 / 15, abs=1e-12)
    # token mean of s_i: (3 s_0 + 4 (s_1 + s_2 + s_3)) / 15
    assert stats.ratio_mean == pytest.approx((3 * s[0] + 4 * (s[1] + s[2] + s[3])) / 15, abs=1e-12)


def test_gspo_gradient_is_the_sequence_objectives() -> None:
    logprobs, old, advantages, mask = _gspo_inputs()
    per_token, _ = gspo(logprobs, old, advantages, mask, 0.2, 0.28)
    aggregate(per_token, mask, "seq_mean_token_mean").backward()
    assert logprobs.grad is not None

    # The sequence objective written out, s_i differentiable: -1/N sum_i min(s_i A, clip(s_i) A)
    reference = logprobs.detach().clone().requires_grad_()
    log_s = ((reference - old) * mask).sum(dim=-1) / mask.sum(dim=-1)
    s = torch.exp(log_s)
    objective = torch.minimum(s * advantages, torch.clamp(s, 0.8, 1.28) * advantages)
    (-objective.mean()).backward()
    assert reference.grad is not None
    torch.testing.assert_close(logprobs.grad, reference.grad, atol=1e-12, rtol=0)
    # by hand: d/dlogp_t of -s_i A_i / N = -A_i s_i / (N |y_i|) inside the clip, 0 when clipped
    s_0, s_3 = _sequence_ratios()[0], _sequence_ratios()[3]
    assert logprobs.grad[0].tolist() == pytest.approx([-s_0 / 12] * 3 + [0.0], abs=1e-12)
    assert logprobs.grad[1].tolist() == pytest.approx([0.0] * 4, abs=1e-12)
    assert logprobs.grad[2].tolist() == pytest.approx([0.0] * 4, abs=1e-12)
    assert logprobs.grad[3].tolist() == pytest.approx([0.5 * s_3 / 16] * 4, abs=1e-12)


# --- cispo --------------------------------------------------------------------------------------
# CISPO (arXiv:2506.13585, eq. 4-5): loss_t = -sg(clip(r_t, 1 - eps_low, 1 + eps_high)) A logp_t.
# With RATIOS [1.5, 0.5, 1.1] and clip range [0.8, 1.3] the weights are [1.3, 0.8, 1.1].


def test_cispo_keeps_the_gradient_of_clipped_tokens() -> None:
    logprobs, old, advantages, mask = _policy_inputs([[1, 1, 1], [1, 1, 1]])
    per_token, stats = cispo(logprobs, old, advantages, mask, EPS_LOW, EPS_HIGH)
    weights = [1.3, 0.8, 1.1]
    lp = logprobs.tolist()
    # values: -w * A * logp
    assert per_token.tolist() == [
        pytest.approx([-w * 2.0 * x for w, x in zip(weights, lp[0], strict=True)], abs=1e-12),
        pytest.approx([w * 1.0 * x for w, x in zip(weights, lp[1], strict=True)], abs=1e-12),
    ]
    (per_token * mask).sum().backward()
    # gradient: -w * A on every token, the clipped ones (1.5 -> 1.3, 0.5 -> 0.8) included, and no
    # term from the weight (it is detached: d/dlogp of -w(logp) A logp would add -A r logp)
    assert logprobs.grad is not None
    assert logprobs.grad.tolist() == [
        pytest.approx([-2.6, -1.6, -2.2], abs=1e-12),
        pytest.approx([1.3, 0.8, 1.1], abs=1e-12),
    ]
    # the weight differs from the ratio on 4 of 6 tokens, whatever the advantage's sign
    assert stats.clip_fraction == pytest.approx(4 / 6, abs=1e-12)


# --- kl_estimate --------------------------------------------------------------------------------


def test_k1_and_k3_values() -> None:
    logprobs = torch.log(_t([[0.5, 0.25, 0.3]]))
    ref_logprobs = torch.log(_t([[0.25, 0.5, 0.3]]))
    log2 = math.log(2)  # 0.69314718
    # k1 = logp - ref: [log 2, -log 2, 0]
    k1 = kl_estimate(logprobs, ref_logprobs, "k1")
    assert k1.tolist()[0] == pytest.approx([log2, -log2, 0.0], abs=1e-12)
    # k3 = exp(ref - logp) - (ref - logp) - 1:
    #   token 0: 0.5 + log 2 - 1 = 0.19314718;  token 1: 2 - log 2 - 1 = 0.30685282;  token 2: 0
    k3 = kl_estimate(logprobs, ref_logprobs, "k3")
    assert k3.tolist()[0] == pytest.approx([0.19314718, 0.30685282, 0.0], abs=1e-8)


def test_k2_and_k3_clamped_values() -> None:
    logprobs = torch.log(_t([[0.5, 0.25, 0.3]]))
    ref_logprobs = torch.log(_t([[0.25, 0.5, 0.3]]))
    # k2 = (ref - logp)^2 / 2: (log 2)^2 / 2 = 0.24022651 on both sides, 0 where equal
    k2 = kl_estimate(logprobs, ref_logprobs, "k2")
    assert k2.tolist()[0] == pytest.approx([0.24022651, 0.24022651, 0.0], abs=1e-8)
    # k3_clamped is k3 where the clamps do not bite
    k3_clamped = kl_estimate(logprobs, ref_logprobs, "k3_clamped")
    assert k3_clamped.tolist()[0] == pytest.approx([0.19314718, 0.30685282, 0.0], abs=1e-8)


def test_k3_clamped_bounds_a_collapsed_token() -> None:
    # log_r = ref - logp in [-30, 30, -5]
    logprobs = _t([[0.0, -30.0, -1.0]])
    ref_logprobs = _t([[-30.0, 0.0, -6.0]])
    # k3: exp(-30) + 30 - 1 = 29;  exp(30) - 31;  exp(-5) + 5 - 1 = 4.00673795
    k3 = kl_estimate(logprobs, ref_logprobs, "k3")
    assert k3.tolist()[0] == pytest.approx([29.0, math.exp(30) - 31, 4.00673795], rel=1e-9)
    # clamped: log_r to [-20, 20], then the result to [-10, 10]:
    #   exp(-20) + 20 - 1 = 19.0 -> 10;  exp(20) - 21 -> 10;  4.00673795 (inside)
    k3_clamped = kl_estimate(logprobs, ref_logprobs, "k3_clamped")
    assert k3_clamped.tolist()[0] == pytest.approx([10.0, 10.0, 4.00673795], abs=1e-8)


def test_kl_aggregates_with_the_policy_mask() -> None:
    logprobs = torch.log(_t([[0.5, 0.25], [0.5, 0.9]]))
    ref_logprobs = torch.log(_t([[0.25, 0.5], [0.25, 0.1]]))
    mask = _t([[1, 1], [1, 0]])
    k3 = kl_estimate(logprobs, ref_logprobs, "k3")
    # token: (0.19314718 + 0.30685282 + 0.19314718) / 3
    assert aggregate(k3, mask, "token_mean").item() == pytest.approx(0.69314718 / 3, abs=1e-8)
    # sequence: mean((0.19314718 + 0.30685282) / 2, 0.19314718) = (0.25 + 0.19314718) / 2
    assert aggregate(k3, mask, "seq_mean_token_mean").item() == pytest.approx(0.22157359, abs=1e-8)


# --- entropy_from_logits ------------------------------------------------------------------------


def test_entropy_by_hand() -> None:
    # logits [0, log 3]: p = [1/4, 3/4], H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.56233514
    # uniform logits over 5 values: H = ln 5
    assert entropy_from_logits(_t([0.0, math.log(3)])).item() == pytest.approx(0.56233514, abs=1e-8)
    assert entropy_from_logits(_t([2.0] * 5)).item() == pytest.approx(math.log(5), abs=1e-12)


def test_entropy_is_minus_sum_p_log_p() -> None:
    logits = 3 * torch.randn(
        2, 3, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    p = torch.exp(logits) / torch.exp(logits).sum(dim=-1, keepdim=True)
    expected = -(p * torch.log(p)).sum(dim=-1)
    torch.testing.assert_close(entropy_from_logits(logits), expected, atol=1e-12, rtol=0)


# --- mismatch_weights ---------------------------------------------------------------------------
# w = pi_trainer / pi_engine per token, cap 2. Row 1's last token is masked (w = 100, ignored).
#   row 0: w [0.25, 1.5, 3.0]  product 1.125
#   row 1: w [1.25, 2.4, -]    product 3.0
# TIS multiplies by min(w, cap); MIS keeps a token (weight 1) iff 1/cap <= w <= cap, else 0.
MISMATCH_RATIOS = [[0.25, 1.5, 3.0], [1.25, 2.4, 100.0]]
MISMATCH_MASK = [[1, 1, 1], [1, 1, 0]]


def _mismatch(mode: str, level: str) -> tuple:
    trainer = torch.log(_t([[0.5, 0.2, 0.9], [0.3, 0.6, 0.01]]))
    engine = trainer - torch.log(_t(MISMATCH_RATIOS))
    return mismatch_weights(trainer, engine, _t(MISMATCH_MASK), mode, level, 2.0)


def _k3_mean() -> float:
    # k3 of KL(trainer || engine) with log_r = engine - trainer = -log w: 1/w + log w - 1
    kept = [0.25, 1.5, 3.0, 1.25, 2.4]
    return sum(1 / w + math.log(w) - 1 for w in kept) / 5


@pytest.mark.parametrize(
    ("mode", "level", "expected", "masked", "ratio_mean"),
    [
        # token TIS: min(w, 2)
        ("tis", "token", [[0.25, 1.5, 2.0], [1.25, 2.0, 0.0]], 0.0, 8.4 / 5),
        # token MIS: 0.25 < 1/2 and 3.0, 2.4 > 2 are dropped: 3 of 5 tokens
        ("mis", "token", [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], 3 / 5, 8.4 / 5),
        # sequence TIS: min(1.125, 2) on row 0, min(3.0, 2) on row 1
        ("tis", "sequence", [[1.125] * 3, [2.0, 2.0, 0.0]], 0.0, (3 * 1.125 + 2 * 3.0) / 5),
        # sequence MIS: row 0 (1.125) kept, row 1 (3.0 > 2) dropped: 2 of 5 tokens
        ("mis", "sequence", [[1.0] * 3, [0.0, 0.0, 0.0]], 2 / 5, (3 * 1.125 + 2 * 3.0) / 5),
        ("off", "token", MISMATCH_MASK, 0.0, 8.4 / 5),
    ],
)
def test_mismatch_weights(
    mode: str, level: str, expected: list, masked: float, ratio_mean: float
) -> None:
    weights, stats = _mismatch(mode, level)
    torch.testing.assert_close(weights, _t(expected), atol=1e-12, rtol=0)
    assert stats.masked == pytest.approx(masked, abs=1e-12)
    # ratio statistics are token means over the response: token level (0.25 + 1.5 + 3 + 1.25 +
    # 2.4) / 5 = 8.4 / 5; max 3.0 at both levels (the masked 100 is not counted)
    assert stats.ratio_mean == pytest.approx(ratio_mean, abs=1e-12)
    assert stats.ratio_max == pytest.approx(3.0, abs=1e-12)
    assert stats.kl == pytest.approx(_k3_mean(), abs=1e-12)


# --- overlong_penalty ---------------------------------------------------------------------------
# DAPO (arXiv:2503.14476, eq. 13), L_max = 100, L_cache = 20:
#   R(y) = 0                                   if |y| <= L_max - L_cache = 80
#        = ((L_max - L_cache) - |y|) / L_cache if 80 < |y| <= 100
#        = -1                                  if |y| > 100
# scaled by ``penalty``.


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        (10, 0.0),
        (80, 0.0),  # the last length with no punishment
        (81, -1 / 20),  # (80 - 81) / 20
        (90, -0.5),  # (80 - 90) / 20
        (100, -1.0),  # (80 - 100) / 20
        (101, -1.0),
        (500, -1.0),
    ],
)
def test_overlong_penalty_regions(length: int, expected: float) -> None:
    assert overlong_penalty(length, 100, 20, 1.0) == pytest.approx(expected, abs=1e-12)
    assert overlong_penalty(length, 100, 20, 0.5) == pytest.approx(0.5 * expected, abs=1e-12)


def test_overlong_penalty_off_without_a_cache() -> None:
    assert overlong_penalty(500, 100, 0, 1.0) == 0.0


# --- KL as a reward penalty ----------------------------------------------------------------------


def test_kl_penalized_rewards_subtract_the_kl_on_every_response_token() -> None:
    rewards = _t([[0.0, 0.0, 1.0, 0.0]])
    mask = _t([[1, 1, 1, 0]])
    logprobs, ref = _t([[-1.0, -2.0, -0.5, -9.0]]), _t([[-1.5, -2.0, -0.25, -1.0]])
    # k1 = logp - ref_logp: 0.5, 0, -0.25 (and the padding's 8, masked)
    out = kl_penalized_rewards(rewards, logprobs, ref, mask, coef=0.1, estimator="k1")
    assert out[0].tolist() == pytest.approx([-0.05, 0.0, 1.025, 0.0], abs=1e-12)


def test_reinforce_pp_returns_sum_the_rewards_ahead() -> None:
    # row 0: rewards 1, 2, 3 on a response with a tool token (mask 0) between the 1 and the 2
    rewards = _t([[1.0, 5.0, 2.0, 3.0], [0.0, 0.0, 4.0, 0.0]])
    mask = _t([[1, 0, 1, 1], [0, 1, 1, 0]])
    g = 0.5
    returns = [[1 + g * (2 + g * 3), 2 + g * 3, 3.0], [g * 0 + 4 * g, 4.0]]  # row 1: 0 + g*4, 4
    flat = _t([x for row in returns for x in row])
    mean = flat.mean()
    std = torch.sqrt(((flat - mean) ** 2).sum() / (len(flat) - 1) + 1e-8)
    expected = ((flat - mean) / std).tolist()
    out = reinforce_pp_returns(rewards, mask, gamma=g)
    # masked_whiten divides by the token count + 1e-8: within 1e-7 of the exact statistics
    assert out[mask.bool()].tolist() == pytest.approx(expected, abs=1e-7)
    assert out[~mask.bool()].tolist() == [0.0, 0.0, 0.0]


def test_reinforce_pp_returns_of_an_outcome_reward_are_the_whitened_scores() -> None:
    g = torch.Generator().manual_seed(4)
    mask = (torch.rand(6, 5, generator=g) < 0.8).double()
    mask[:, 0] = 1.0
    scores = torch.randn(6, generator=g, dtype=torch.float64)
    last = (torch.arange(5) * mask).argmax(dim=-1)
    rewards = torch.zeros_like(mask)
    rewards[torch.arange(6), last] = scores
    expected = batch_whitened(scores, mask.sum(dim=-1), None)[:, None] * mask
    assert torch.allclose(reinforce_pp_returns(rewards, mask), expected, atol=1e-9)

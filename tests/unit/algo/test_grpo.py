"""GRPO math against numbers computed by hand (the arithmetic is in the comments)."""

import math

import pytest
import torch

from miles.algo import clipped_policy_loss, group_advantages, kl_penalty, masked_aggregate

torch.set_num_threads(1)


def _t(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# --- group_advantages ---------------------------------------------------------------------------


def test_advantages_use_population_std() -> None:
    # [1, 0, 0, 1]: mean 0.5, population std sqrt(4 * 0.25 / 4) = 0.5 -> ±0.5 / (0.5 + eps)
    advantages = group_advantages(_t([[1, 0, 0, 1]]), scale_by_std=True, eps=1e-6)
    a = 0.5 / 0.500001
    assert advantages[0].tolist() == pytest.approx([a, -a, -a, a], abs=1e-12)


def test_advantages_per_group_rows() -> None:
    # row 0: [3, 0, 0]: mean 1, centred [2, -1, -1], var (4 + 1 + 1) / 3 = 2, std sqrt(2)
    #        -> [2 / 1.41421356, -1 / 1.41421356, ...] = [1.41421356, -0.70710678, -0.70710678]
    # row 1: [5, 7, 9]: mean 7, centred [-2, 0, 2], var 8 / 3, std 1.63299316
    #        -> [-2 / 1.63299316, 0, 2 / 1.63299316] = [-1.22474487, 0, 1.22474487]
    advantages = group_advantages(_t([[3, 0, 0], [5, 7, 9]]), scale_by_std=True, eps=0.0)
    expected = [[1.41421356, -0.70710678, -0.70710678], [-1.22474487, 0.0, 1.22474487]]
    assert advantages.tolist()[0] == pytest.approx(expected[0], abs=1e-8)
    assert advantages.tolist()[1] == pytest.approx(expected[1], abs=1e-8)


def test_dr_grpo_only_centres() -> None:
    advantages = group_advantages(_t([[1, 0, 0, 1], [3, 0, 0, 1]]), scale_by_std=False)
    # row 1: mean 1 -> [2, -1, -1, 0]
    assert advantages.tolist() == [[0.5, -0.5, -0.5, 0.5], [2.0, -1.0, -1.0, 0.0]]


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_zero_variance_group_gives_zero_not_nan(scale_by_std: bool) -> None:
    advantages = group_advantages(
        torch.tensor([[2.0, 2.0, 2.0, 2.0], [1.0, 0.0, 1.0, 0.0]]), scale_by_std=scale_by_std
    )
    assert not torch.isnan(advantages).any()
    assert advantages[0].tolist() == [0.0, 0.0, 0.0, 0.0]


# --- clipped_policy_loss ------------------------------------------------------------------------
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


def _policy_inputs(mask: list[list[float]]) -> tuple[torch.Tensor, ...]:
    old_logprobs = _t([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.5]])
    logprobs = (old_logprobs + torch.log(_t(RATIOS))).requires_grad_()
    return logprobs, old_logprobs, _t(ADVANTAGES), _t(mask)


def test_clipping_on_both_sides_token_aggregation() -> None:
    logprobs, old, advantages, mask = _policy_inputs([[1, 1, 1], [1, 1, 1]])
    loss, stats = clipped_policy_loss(logprobs, old, advantages, mask, EPS_LOW, EPS_HIGH, "token")
    # (-2.6 - 1.0 - 2.2 + 1.5 + 0.8 + 1.1) / 6 = -2.4 / 6
    assert loss.item() == pytest.approx(-0.4, abs=1e-12)
    # clipped: seq 0 token 0 and seq 1 token 1 -> 2 of 6
    assert stats.clip_fraction == pytest.approx(1 / 3)
    # (1.5 + 0.5 + 1.1) * 2 / 6
    assert stats.ratio_mean == pytest.approx(3.1 / 3, abs=1e-12)


def test_aggregations_with_unequal_lengths() -> None:
    # sequence 1 keeps only its first token
    mask = [[1, 1, 1], [1, 0, 0]]
    logprobs, old, advantages, mask_t = _policy_inputs(mask)
    token, stats = clipped_policy_loss(
        logprobs, old, advantages, mask_t, EPS_LOW, EPS_HIGH, "token"
    )
    sequence, _ = clipped_policy_loss(
        logprobs, old, advantages, mask_t, EPS_LOW, EPS_HIGH, "sequence"
    )
    # token: (-2.6 - 1.0 - 2.2 + 1.5) / 4 = -4.3 / 4
    assert token.item() == pytest.approx(-1.075, abs=1e-12)
    # sequence: mean(-5.8 / 3, 1.5 / 1) = (-5.8 + 4.5) / 6 = -1.3 / 6
    assert sequence.item() == pytest.approx(-1.3 / 6, abs=1e-12)
    # only seq 0 token 0 is clipped among the 4 kept tokens
    assert stats.clip_fraction == pytest.approx(0.25)


def test_gradient_flows_only_through_the_unclipped_term() -> None:
    logprobs, old, advantages, mask = _policy_inputs([[1, 1, 1], [1, 1, 0]])
    loss, _ = clipped_policy_loss(logprobs, old, advantages, mask, EPS_LOW, EPS_HIGH, "token")
    loss.backward()
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
    loss, stats = clipped_policy_loss(
        old.clone(), old, _t([1.0, -3.0]), _t([[1, 1], [1, 0]]), 0.2, 0.28, "token"
    )
    # -(1 + 1 - 3) / 3
    assert loss.item() == pytest.approx(1 / 3, abs=1e-12)
    assert stats.ratio_mean == 1.0
    assert stats.clip_fraction == 0.0


# --- kl_penalty ---------------------------------------------------------------------------------


def test_k1_and_k3_values() -> None:
    logprobs = torch.log(_t([[0.5, 0.25, 0.3]]))
    ref_logprobs = torch.log(_t([[0.25, 0.5, 0.3]]))
    log2 = math.log(2)  # 0.69314718
    # k1 = logp - ref: [log 2, -log 2, 0]
    k1 = kl_penalty(logprobs, ref_logprobs, "k1")
    assert k1.tolist()[0] == pytest.approx([log2, -log2, 0.0], abs=1e-12)
    # k3 = exp(ref - logp) - (ref - logp) - 1:
    #   token 0: 0.5 + log 2 - 1 = 0.19314718;  token 1: 2 - log 2 - 1 = 0.30685282;  token 2: 0
    k3 = kl_penalty(logprobs, ref_logprobs, "k3")
    assert k3.tolist()[0] == pytest.approx([0.19314718, 0.30685282, 0.0], abs=1e-8)


def test_kl_aggregates_with_the_policy_mask() -> None:
    logprobs = torch.log(_t([[0.5, 0.25], [0.5, 0.9]]))
    ref_logprobs = torch.log(_t([[0.25, 0.5], [0.25, 0.1]]))
    mask = _t([[1, 1], [1, 0]])
    k3 = kl_penalty(logprobs, ref_logprobs, "k3")
    # token: (0.19314718 + 0.30685282 + 0.19314718) / 3
    assert masked_aggregate(k3, mask, "token").item() == pytest.approx(0.69314718 / 3, abs=1e-8)
    # sequence: mean((0.19314718 + 0.30685282) / 2, 0.19314718) = (0.25 + 0.19314718) / 2
    assert masked_aggregate(k3, mask, "sequence").item() == pytest.approx(0.22157359, abs=1e-8)

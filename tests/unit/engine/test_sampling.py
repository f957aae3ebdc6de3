from __future__ import annotations

import math

import torch

from miles.engine.protocol import SamplingParams
from miles.engine.sampling import sample_next_token, sampling_logits, top_k_filter, top_p_filter

NEG_INF = float("-inf")


def test_top_k_keeps_exactly_k_largest() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0, 3.0, 0.0])
    kept = top_k_filter(logits, 2)
    assert torch.isfinite(kept).sum() == 2
    assert kept.tolist() == [NEG_INF, 3.0, NEG_INF, 3.0, NEG_INF]


def test_top_k_disabled_when_non_positive_or_at_least_vocab() -> None:
    logits = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(top_k_filter(logits, -1), logits)
    assert torch.equal(top_k_filter(logits, 3), logits)


def test_top_p_keeps_smallest_set_reaching_mass() -> None:
    probs = torch.tensor([0.1, 0.5, 0.3, 0.1])
    logits = probs.log()
    # 0.5 alone does not exceed 0.6; 0.5 + 0.3 does, so the two 0.1 tokens go.
    kept = top_p_filter(logits, 0.6)
    assert torch.isfinite(kept).tolist() == [False, True, True, False]
    assert torch.allclose(kept[1:3], logits[1:3])


def test_top_p_always_keeps_most_likely_token() -> None:
    logits = torch.tensor([0.0, 2.0, 1.0])
    assert torch.isfinite(top_p_filter(logits, 0.0)).tolist() == [False, True, False]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_sampling_logits_scale_by_temperature_before_filtering() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0])
    params = SamplingParams(temperature=0.5, top_k=2)
    assert sampling_logits(logits, params).tolist() == [NEG_INF, 2.0, 4.0]


def test_greedy_takes_argmax_and_reports_raw_logprob() -> None:
    logits = torch.tensor([0.0, 3.0, 1.0])
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    token, logprob = sample_next_token(logits, SamplingParams(temperature=0.0), generator)
    assert token == 1
    assert math.isclose(logprob, float(logits.log_softmax(-1)[1]), rel_tol=1e-6)
    assert torch.equal(generator.get_state(), state)  # greedy draws no randomness


def test_sampling_never_picks_filtered_tokens_and_logprob_ignores_filters() -> None:
    logits = torch.tensor([2.0, 1.9, 0.0, -1.0])
    params = SamplingParams(temperature=0.7, top_k=2)
    generator = torch.Generator().manual_seed(0)
    raw_logprobs = logits.log_softmax(-1)
    for _ in range(50):
        token, logprob = sample_next_token(logits, params, generator)
        assert token in (0, 1)
        assert logprob == float(raw_logprobs[token])


def test_same_seed_same_tokens() -> None:
    logits = torch.randn(20, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0)
    first, second = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    draws_first = [sample_next_token(logits, params, first)[0] for _ in range(20)]
    draws_second = [sample_next_token(logits, params, second)[0] for _ in range(20)]
    assert draws_first == draws_second
    assert len(set(draws_first)) > 1

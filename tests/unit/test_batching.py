"""The buffer's pure logic: which groups are dropped and why, and the batch they become."""

import math

import pytest
import torch

from miles.algo.batching import (
    BAD_INPUT,
    FILTER_REASONS,
    batch_id,
    filter_reason,
    make_batch,
    shaped_reward,
)
from miles.config import DAPO, GRPO, RLOO, BufferConfig, DrGRPO, ReinforcePP
from miles.events import Batch, Sample, ScoredGroup, Turn, decode, encode

EPS = 1e-6  # group_advantages' default, added to the std


def _group(
    task_id: str, rewards: list[float], version: int = 0, failed: tuple[int, ...] = ()
) -> ScoredGroup:
    samples = [
        Sample(
            sample_id=f"{task_id}/{i}",
            prompt="1+1=",
            label="2",
            prompt_ids=[1, 2, 3],
            response_ids=[4, 5],
            response_logprobs=[-0.5, -0.25],
            response_text="2",
            finish_reason="stop",
            policy_version_first=version,
            policy_version_last=version,
            reward=reward,
            failed=i in failed,
        )
        for i, reward in enumerate(rewards)
    ]
    return ScoredGroup(
        run_id="r",
        policy_version=version,
        task_id=task_id,
        split="train",
        eval_round=-1,
        samples=samples,
    )


STRICT = BufferConfig(max_staleness=0)


@pytest.mark.parametrize(
    ("group", "trainer_version", "buffer", "reason"),
    [
        (_group("a", [1, 0]), 0, STRICT, None),
        (_group("a", [1, 0, 0], failed=(0, 1)), 0, STRICT, "failed"),  # one valid sample left
        (_group("a", [1, 0], version=3), 2, STRICT, "future_version"),
        (_group("a", [1, 0], version=1), 2, STRICT, "stale"),
        (_group("a", [1, 0], version=1), 2, BufferConfig(max_staleness=1), None),
        (_group("a", [1, 0], version=0), 2, BufferConfig(max_staleness=1), "stale"),
        (_group("a", [0.5, 0.5]), 0, STRICT, "zero_variance"),
        (_group("a", [0.5, 0.5]), 0, BufferConfig(filter_zero_variance=False), None),
        # variance only among failed samples does not count: the valid ones are all equal
        (_group("a", [1, 1, 0], failed=(2,)), 0, STRICT, "zero_variance"),
    ],
)
def test_filter_reason(
    group: ScoredGroup, trainer_version: int, buffer: BufferConfig, reason: str | None
) -> None:
    assert filter_reason(group, trainer_version, buffer) == reason
    assert reason is None or reason in FILTER_REASONS  # every reason is exported from the start


def test_bad_input_is_a_filter_reason_too() -> None:
    # a broken producer's group is dead-lettered *and* filtered, so the coordinator replaces it
    assert (
        set(FILTER_REASONS)
        >= BAD_INPUT
        == {
            "non_finite_reward",
            "future_version",
            "bad_loss_mask",
        }
    )


def test_make_batch_advantages_by_hand() -> None:
    # group a: [1, 0]: mean 0.5, population std 0.5 -> [+0.5, -0.5] / (0.5 + eps)
    # group b: [3, 0, 0] (sample 3 failed, excluded): mean 1, centred [2, -1, -1],
    #          variance (4 + 1 + 1) / 3 = 2, std sqrt(2) -> [2, -1, -1] / (sqrt(2) + eps)
    a = _group("a", [1, 0], version=2)
    b = _group("b", [3, 0, 0, 9], version=1, failed=(3,))
    batch = make_batch("r", [a, b], GRPO(std="population"), 4)
    half = 0.5 / (0.5 + EPS)
    root2 = math.sqrt(2) + EPS
    assert [s.sample_id for s in batch.samples] == ["a/0", "a/1", "b/0", "b/1", "b/2"]
    assert [s.advantage for s in batch.samples] == pytest.approx(
        [half, -half, 2 / root2, -1 / root2, -1 / root2], abs=1e-12
    )
    assert [s.reward for s in batch.samples] == [1, 0, 3, 0, 0]
    assert [s.policy_version for s in batch.samples] == [2, 2, 1, 1, 1]
    assert batch.task_ids == ["a", "b"]
    assert batch.policy_version == 1  # the oldest group's version
    assert batch.run_id == "r"
    assert batch.samples[0].response_logprobs == [-0.5, -0.25]


def test_make_batch_dr_grpo_keeps_only_the_centring() -> None:
    # [3, 0, 0]: mean 1 -> [2, -1, -1], not divided by the std (Dr.GRPO)
    batch = make_batch("r", [_group("b", [3, 0, 0])], DrGRPO(), 4)
    assert [s.advantage for s in batch.samples] == pytest.approx([2, -1, -1])


def test_batch_id_is_stable_under_reordering() -> None:
    a, b = _group("a", [1, 0]), _group("b", [0, 1])
    forward = make_batch("r", [a, b], GRPO(kl_coef=0.0, aggregation="token_mean"), 4)
    backward = make_batch("r", [b, a], GRPO(kl_coef=0.0, aggregation="token_mean"), 4)
    assert forward.batch_id == backward.batch_id == batch_id(["b", "a"])
    assert forward.batch_id.startswith("b-")
    assert (
        make_batch(
            "r", [a, _group("c", [0, 1])], GRPO(kl_coef=0.0, aggregation="token_mean"), 4
        ).batch_id
        != forward.batch_id
    )


def _lengths(group: ScoredGroup, lengths: list[int]) -> ScoredGroup:
    for sample, length in zip(group.samples, lengths, strict=True):
        sample.response_ids = [4] * length
        sample.response_logprobs = [-0.5] * length
    return group


def test_make_batch_rloo_baselines_each_sample_on_the_others() -> None:
    # [1, 0, 0, 1]: A_0 = 1 - (0 + 0 + 1) / 3 = 2/3, A_1 = 0 - (1 + 0 + 1) / 3 = -2/3
    batch = make_batch("r", [_group("a", [1, 0, 0, 1])], RLOO(), 4)
    assert [s.advantage for s in batch.samples] == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])


def test_make_batch_reinforce_pp_whitens_over_the_batch_by_tokens() -> None:
    # Without baseline: rewards [1, 0] with 1 and 3 tokens, [1, 1] with 2 and 2 tokens.
    # token-weighted mean (1*1 + 0*3 + 1*2 + 1*2) / 8 = 5/8; variance with Bessel over 8 tokens:
    # (1 * (3/8)^2 + 3 * (5/8)^2 + 4 * (3/8)^2) / 8 * 8/7 = (9 + 75 + 36) / 64 / 7 = 120 / 448
    a = _lengths(_group("a", [1, 0]), [1, 3])
    b = _lengths(_group("b", [1, 1]), [2, 2])
    std = math.sqrt(120 / 448 + 1e-8)
    plain = make_batch("r", [a, b], ReinforcePP(baseline=False), 4)
    expected = [(1 - 5 / 8) / std, (0 - 5 / 8) / std, (1 - 5 / 8) / std, (1 - 5 / 8) / std]
    # 1e-7: verl's masked mean divides by the token count + 1e-8, left out above
    assert [s.advantage for s in plain.samples] == pytest.approx(expected, abs=1e-7)
    # With the group baseline: centred [0.5, -0.5] and [0, 0]; token mean (0.5 - 1.5) / 8 = -1/8
    # variance ((5/8)^2 + 3 (3/8)^2 + 4 (1/8)^2) / 8 * 8/7 = (25 + 27 + 4) / 64 / 7 = 56 / 448
    std = math.sqrt(56 / 448 + 1e-8)
    baseline = make_batch("r", [a, b], ReinforcePP(), 4)
    expected = [5 / 8 / std, -3 / 8 / std, 1 / 8 / std, 1 / 8 / std]
    assert [s.advantage for s in baseline.samples] == pytest.approx(expected, abs=1e-7)


def test_make_batch_dapo_punishes_overlong_answers_before_the_advantage() -> None:
    # max 10 tokens, L_cache = 0.2 * 10 = 2: lengths 8 (no penalty), 9 (-0.5) and 10 (-1)
    group = _lengths(_group("a", [1, 1, 1]), [8, 9, 10])
    batch = make_batch("r", [group], DAPO(), 10)
    shaped = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    expected = (shaped - shaped.mean()) / (shaped.std(correction=0) + EPS)
    assert [s.advantage for s in batch.samples] == pytest.approx(expected.tolist(), abs=1e-12)
    assert [s.reward for s in batch.samples] == [1, 1, 1]  # the scorer's reward is kept


def _multi_turn(group: ScoredGroup) -> ScoredGroup:
    """Each sample as a trajectory makes it: a model turn, a tool's output, a model turn."""
    for sample in group.samples:
        sample.response_ids = [4, 7, 8, 5]
        sample.response_logprobs = [-0.5, 0.0, 0.0, -0.25]
        sample.loss_mask = [1, 0, 0, 1]
        sample.turns = [
            Turn(role="assistant", start=0, end=1, trained=True, text="?"),
            Turn(role="tool", start=1, end=3, trained=False, text="[2]"),
            Turn(role="assistant", start=3, end=4, trained=True, text="2"),
        ]
    return group


def test_make_batch_carries_the_loss_mask_and_the_turns_through_the_wire() -> None:
    group = _multi_turn(_group("a", [1, 0]))
    batch = make_batch("r", [group, _group("b", [0, 1])], GRPO(), 4)
    received = decode(encode(batch), Batch, "r")
    first, plain = received.samples[0], received.samples[2]
    assert first.loss_mask == [1, 0, 0, 1]
    assert [(t.role, t.start, t.end, t.trained) for t in first.turns] == [
        ("assistant", 0, 1, True),
        ("tool", 1, 3, False),
        ("assistant", 3, 4, True),
    ]
    assert all(t.text == "" for t in first.turns)  # the trainer needs spans, not the text
    assert (plain.loss_mask, plain.turns) == ([], [])  # a single completion: all trained


def test_a_mask_that_does_not_fit_the_response_is_dead_lettered() -> None:
    group = _multi_turn(_group("a", [1, 0]))
    group.samples[1].loss_mask = [1, 0]
    assert filter_reason(group, 0, STRICT) == "bad_loss_mask"
    assert "bad_loss_mask" in BAD_INPUT  # a broken rollout, not a useless group


def test_tool_tokens_count_neither_for_length_nor_for_token_weights() -> None:
    # DAPO at max 3 tokens (L_cache 1): the multi-turn sample has 4 response tokens but only 2
    # of its own, so it is not punished; a plain 4-token answer would be.
    group = _multi_turn(_group("a", [1, 0]))
    assert shaped_reward(group.samples[0], DAPO(), 3) == 1.0
    plain = _lengths(_group("b", [1, 0]), [4, 2])
    assert shaped_reward(plain.samples[0], DAPO(), 3) == 0.0
    # REINFORCE++ weighs each sample by its trained tokens: 2 and 2 here (4 response tokens
    # against 2), so the token-weighted mean of rewards [1, 0] is 1/2 and A = +-0.5 / std,
    # Bessel's correction over 4 tokens: std = sqrt(4/3 * 0.25).
    group.samples[1] = _lengths(_group("c", [0]), [2]).samples[0]
    batch = make_batch("r", [group], ReinforcePP(baseline=False), 4)
    expected = 0.5 / math.sqrt(0.25 * 4 / 3 + 1e-8)
    assert [s.advantage for s in batch.samples] == pytest.approx([expected, -expected], abs=1e-6)

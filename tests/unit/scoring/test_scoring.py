"""Rewards: both signatures, weights, the concurrency bound, timeouts and bad values, each
failure recorded on the sample instead of raised; and the built-in scorers."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from typing import Any

import pytest

import miles
from miles.events import Sample
from miles.scoring import Limits, from_recipe, is_batched, score_samples
from miles.scoring.builtin import final_answer


def sample(text: str, label: Any = "", **metadata: Any) -> Sample:
    return Sample(
        sample_id=f"t0/{text}",
        prompt="q",
        label=label,
        metadata=metadata,
        prompt_ids=[1],
        response_ids=[2, 3],
        response_logprobs=[0.0, 0.0],
        response_text=text,
        finish_reason="stop",
        policy_version_first=0,
        policy_version_last=0,
    )


async def score(
    samples: list[Sample],
    weights: dict[str, float] | None = None,
    concurrency: int = 4,
    timeout: float = 5.0,
    **rewards: Any,
) -> list[dict[str, float]]:
    limits = Limits(concurrency, timeout)
    try:
        return await score_samples(samples, from_recipe(rewards), weights or {}, limits)
    finally:
        limits.close()


async def test_per_sample_and_batched_rewards_add_up_with_weights() -> None:
    def length(s: Sample) -> float:
        return len(s.response_text)

    def right(
        prompts: list[str], completions: list[str], answer: list[int], **kw: Any
    ) -> list[float]:
        assert prompts == ["q", "q"] and kw["completion_ids"] == [[2, 3], [2, 3]]
        return [float(int(c) == a) for c, a in zip(completions, answer, strict=True)]

    assert not is_batched(length) and is_batched(right)
    samples = [sample("12", answer=12), sample("7", answer=8)]
    values = await score(samples, {"right": 2.0, "length": 0.5}, length=length, right=right)
    assert values == [{"length": 2.0, "right": 1.0}, {"length": 1.0, "right": 0.0}]
    assert [s.reward for s in samples] == [2.0 * 1 + 0.5 * 2, 0.5 * 1]


async def test_a_batched_reward_gets_only_the_columns_it_names() -> None:
    seen: dict[str, Any] = {}

    def narrow(completions: list[str], answer: list[int]) -> list[float]:
        seen.update(completions=completions, answer=answer)
        return [0.0] * len(completions)

    await score([sample("1", answer=1, extra="x")], narrow=narrow)
    assert seen == {"completions": ["1"], "answer": [1]}


async def test_async_rewards_run_concurrently_under_the_bound() -> None:
    running, peak = 0, 0

    async def slow(s: Sample) -> float:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        return 1.0

    start = time.monotonic()
    await score([sample(str(i)) for i in range(12)], concurrency=3, slow=slow)
    assert peak == 3
    assert time.monotonic() - start < 12 * 0.05  # not one at a time


async def test_sync_rewards_run_off_the_event_loop() -> None:
    loop_threads: set[int] = set()

    def blocking(s: Sample) -> float:
        loop_threads.add(threading.get_ident())
        time.sleep(0.02)
        return 1.0

    await score([sample(str(i)) for i in range(4)], blocking=blocking)
    assert threading.get_ident() not in loop_threads


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_reward_that_hangs_fails_its_sample_after_the_timeout(kind: str) -> None:
    release = threading.Event()

    def hang_sync(s: Sample) -> float:
        release.wait(5)
        return 1.0

    async def hang_async(s: Sample) -> float:
        await asyncio.sleep(5)
        return 1.0

    fn = hang_sync if kind == "sync" else hang_async
    samples = [sample("a")]
    start = time.monotonic()
    values = await score(samples, timeout=0.2, hang=fn)
    release.set()
    assert time.monotonic() - start < 2
    assert values == [{}] and samples[0].failed
    assert samples[0].error == "hang timed out after 0.2s (reward.timeout_seconds)"


async def test_raising_nan_and_wrong_length_each_fail_with_a_reason() -> None:
    def boom(s: Sample) -> float:
        raise KeyError("label")

    def nan(s: Sample) -> float:
        return math.nan

    def short(completions: list[str]) -> list[float]:
        return [1.0]

    for name, fn, error in [
        ("boom", boom, "boom raised KeyError: 'label'"),
        ("nan", nan, "nan returned nan, not a finite number"),
        ("short", short, "short returned 1 rewards for 2 completions"),
    ]:
        samples = [sample("a"), sample("b")]
        assert await score(samples, **{name: fn}) == [{}, {}]
        assert all(s.failed and s.error == error and s.reward == 0.0 for s in samples)


async def test_one_failing_sample_does_not_fail_the_others() -> None:
    def picky(s: Sample) -> float:
        if s.response_text == "bad":
            raise ValueError("no")
        return 1.0

    samples = [sample("good"), sample("bad")]
    await score(samples, picky=picky)
    assert [s.failed for s in samples] == [False, True]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the answer is \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("work...\n#### 1,000", "1,000"),
        ("it is 7 or maybe 8", "8"),
        ("no idea", None),
    ],
)
def test_final_answer_reads_boxed_then_hashes_then_the_last_number(
    text: str, expected: str | None
) -> None:
    assert final_answer(text) == expected


def test_built_in_rewards() -> None:
    math_answer = miles.rewards.math_answer()
    assert math_answer(sample("\\boxed{1000}", label="#### 1,000")) == 1.0
    assert math_answer(sample("#### 72", label=72)) == 1.0
    assert math_answer(sample("#### 71", label=72)) == 0.0
    assert math_answer(sample("\\boxed{x+1}", label="x+1")) == 1.0
    exact = miles.rewards.exact_match()
    assert exact(sample(" 42\n", label="42")) == 1.0 and exact(sample("42.", label="42")) == 0.0
    think = miles.rewards.format_regex(r"^<think>.*</think>", name="think")
    assert think(sample("<think>a\nb</think> 4")) == 1.0 and think(sample("4")) == 0.0
    assert think.__name__ == "think" and think.__miles_role__ == "reward"

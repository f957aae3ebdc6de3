"""The simulated engine: outputs are functions of the seeds, time is asked of ``sleep``.

Every test runs on a fake clock: ``sleep`` records what the engine asks for and returns at once,
so the timing model is checked exactly and nothing waits for real.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from statistics import fmean

import pytest

from miles.config import SimulatedEngineConfig
from miles.engine.protocol import GenerateRequest, SamplingParams
from miles.engine.simulated import SimulatedEngine, batch_seconds, response_length

CONFIG = SimulatedEngineConfig(
    tokens_per_second=100.0, length_mean=20.0, length_sigma=0.6, prefill_seconds=0.05
)


class FakeClock:
    def __init__(self) -> None:
        self.slept: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


def request(seed: int, max_new_tokens: int = 64) -> GenerateRequest:
    params = SamplingParams(max_new_tokens=max_new_tokens, sampling_seed=seed)
    return GenerateRequest(rid=f"r{seed}", input_ids=[1, 2, 3], sampling_params=params)


def engine(clock: FakeClock, config: SimulatedEngineConfig = CONFIG) -> SimulatedEngine:
    return SimulatedEngine(config, vocab_size=30, sleep=clock.sleep)


async def test_outputs_are_a_function_of_the_seed_and_the_weights() -> None:
    clock = FakeClock()
    first = await engine(clock).generate([request(seed) for seed in range(8)])
    again = await engine(clock).generate([request(seed) for seed in range(8)])

    assert first == again
    assert len({tuple(o.output_ids) for o in first}) == 8  # other seeds, other tokens
    for output in first:
        assert output.completion_tokens == len(output.output_ids) >= 1
        assert len(output.output_token_logprobs) == len(output.output_ids)
        assert all(-2.0 <= lp < 0 for lp in output.output_token_logprobs)
        assert all(0 <= token < 30 for token in output.output_ids)
        assert (output.weight_version, output.prompt_tokens) == (0, 3)


async def test_a_batch_takes_its_longest_response_over_the_rate() -> None:
    clock = FakeClock()
    outputs = await engine(clock).generate([request(seed) for seed in range(8)])

    longest = max(o.completion_tokens for o in outputs)
    assert clock.slept == [pytest.approx(0.05 + longest / 100.0)]
    assert batch_seconds([o.completion_tokens for o in outputs], CONFIG) == clock.slept[0]


def test_lengths_are_lognormal_around_the_mean_and_capped() -> None:
    lengths = [response_length(seed, CONFIG, 1000) for seed in range(4000)]
    assert fmean(lengths) == pytest.approx(20.0, rel=0.05)
    assert max(lengths) > 2 * 20 > min(lengths)  # right-skewed, not constant

    capped = [response_length(seed, CONFIG, 16) for seed in range(200)]
    assert max(capped) == 16 and min(capped) >= 1
    fixed = CONFIG.model_copy(update={"length_sigma": 0.0})
    assert {response_length(seed, fixed, 1000) for seed in range(20)} == {20}


async def test_a_response_cut_at_max_new_tokens_finishes_by_length() -> None:
    outputs = await engine(FakeClock()).generate([request(seed, 8) for seed in range(50)])
    for output in outputs:
        expected = "length" if output.completion_tokens == 8 else "stop"
        assert output.finish_reason == expected
    assert {o.finish_reason for o in outputs} == {"length", "stop"}


async def test_new_weights_change_the_tokens_not_the_lengths(tmp_path: Path) -> None:
    clock = FakeClock()
    loaded = SimulatedEngine(CONFIG.model_copy(update={"load_seconds": 2.5}), 30, clock.sleep)
    before = await loaded.generate([request(seed) for seed in range(4)])

    await loaded.update_weights_from_disk(str(tmp_path), 3)
    after = await loaded.generate([request(seed) for seed in range(4)])

    assert clock.slept[1] == 2.5
    assert await loaded.weight_version() == 3 and loaded.loads == 1
    assert [o.weight_version for o in after] == [3] * 4
    assert [o.completion_tokens for o in after] == [o.completion_tokens for o in before]
    assert [o.output_ids for o in after] != [o.output_ids for o in before]
    with pytest.raises(FileNotFoundError):
        await loaded.update_weights_from_disk(str(tmp_path / "missing"), 4)


async def test_a_request_sent_while_paused_waits_for_continue() -> None:
    simulated = engine(FakeClock())
    await simulated.pause_generation()
    waiting = asyncio.ensure_future(simulated.generate([request(1)]))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiting.done()

    await simulated.continue_generation()
    [output] = await waiting
    assert output.rid == "r1"
    assert await simulated.health()

"""``EngineClient`` that spends time without using the CPU: for measuring orchestration.

A simulated engine lives in the rollout process (``rollout.engine = "simulated"``), so a
thousand of them cost a thousand small objects, not a thousand servers. It answers a batch the
way a continuously batching engine does, every request at once at ``tokens_per_second`` each:
the batch takes ``prefill_seconds`` plus its longest response over the rate, and sleeps for it.

Each response is a pure function of the request's ``sampling_seed``: its length is lognormal
(right-skewed, as RL response lengths are) with mean ``length_mean``, capped at
``max_new_tokens`` (then ``finish_reason`` is "length"); its token ids and logprobs also depend
on the weights' version, as a real policy's would. A benchmark can therefore compute from the
seeds alone how long the engines needed, and compare it with how long the run took. The text is
empty and stop strings are not looked for: nothing reads a simulated completion's words.

Pause, continue and weight loads behave as the seam says (``protocol.EngineClient``): requests
arriving while paused wait; a load takes ``load_seconds``.
"""

from __future__ import annotations

import asyncio
import math
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path

from miles.config import SimulatedEngineConfig
from miles.engine.protocol import GenerateOutput, GenerateRequest

Sleep = Callable[[float], Awaitable[None]]
MASK = (1 << 64) - 1


def response_length(sampling_seed: int, config: SimulatedEngineConfig, max_new_tokens: int) -> int:
    """Tokens the engine generates for a request with this seed (at least one)."""
    drawn = config.length_mean
    if config.length_sigma > 0:
        # mu chosen so that the lognormal's mean is length_mean: E[X] = exp(mu + sigma^2 / 2)
        sigma = config.length_sigma
        mu = math.log(config.length_mean) - sigma * sigma / 2
        drawn = math.exp(mu + sigma * _normal(sampling_seed))
    return max(1, min(max_new_tokens, round(drawn)))


def _mix(value: int) -> int:
    """splitmix64's finaliser (Steele et al. 2014): a cheap, well-spread hash of an integer, so
    a thousand engines cost no ``random.Random`` per request."""
    value = (value + 0x9E3779B97F4A7C15) & MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK
    return value ^ (value >> 31)


def _uniform(value: int) -> float:
    """In (0, 1]: never 0, so its logarithm is finite."""
    return ((_mix(value) >> 11) + 1) * 2.0**-53


def _normal(seed: int) -> float:
    """A standard normal deviate from ``seed`` (Box-Muller on two uniforms)."""
    first, second = _uniform(seed), _uniform(seed ^ 0x5DEECE66D)
    return math.sqrt(-2.0 * math.log(first)) * math.cos(2.0 * math.pi * second)


def batch_seconds(lengths: list[int], config: SimulatedEngineConfig) -> float:
    """How long a batch with these response lengths takes: all requests decode together."""
    return config.prefill_seconds + max(lengths, default=0) / config.tokens_per_second


class SimulatedEngine:
    """One simulated engine (satisfies ``EngineClient``); ``sleep`` is replaceable in tests."""

    def __init__(
        self,
        config: SimulatedEngineConfig,
        vocab_size: int,
        sleep: Sleep = asyncio.sleep,
        weight_version: int = 0,
    ) -> None:
        self.config = config
        self.vocab_size = vocab_size
        self.sleep = sleep
        self.version = weight_version
        self.loads = 0
        self._running = asyncio.Event()  # cleared while paused
        self._running.set()

    async def generate(self, requests: list[GenerateRequest]) -> list[GenerateOutput]:
        await self._running.wait()
        version = self.version  # a batch finishes on the weights it started with
        outputs = [self._output(request, version) for request in requests]
        await self.sleep(batch_seconds([o.completion_tokens for o in outputs], self.config))
        return outputs

    def _output(self, request: GenerateRequest, version: int) -> GenerateOutput:
        params = request.sampling_params
        seed = params.sampling_seed
        if seed is None:  # stable across processes, unlike hash()
            seed = zlib.crc32(request.rid.encode())
        length = response_length(seed, self.config, params.max_new_tokens)
        tokens = _mix(seed ^ (version << 40))  # new weights, new tokens
        first, stride = tokens % self.vocab_size, 1 + (tokens >> 20) % max(self.vocab_size - 1, 1)
        logprob = -0.01 - 1.99 * _uniform(tokens)  # in [-2, -0.01)
        return GenerateOutput(
            rid=request.rid,
            output_ids=[(first + i * stride) % self.vocab_size for i in range(length)],
            text="",
            output_token_logprobs=[logprob] * length,
            finish_reason="length" if length == params.max_new_tokens else "stop",
            weight_version=version,
            prompt_tokens=len(request.input_ids),
            completion_tokens=length,
        )

    async def update_weights_from_disk(self, model_path: str, weight_version: int) -> None:
        if not Path(model_path).is_dir():  # what a real engine would fail on first
            raise FileNotFoundError(f"no weights directory at {model_path}")
        await self.sleep(self.config.load_seconds)
        self.version = weight_version
        self.loads += 1

    async def pause_generation(self) -> None:
        self._running.clear()

    async def continue_generation(self) -> None:
        self._running.set()

    async def weight_version(self) -> int:
        return self.version

    async def health(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None

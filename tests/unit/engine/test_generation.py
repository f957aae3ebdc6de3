"""The handle a rollout function gets: it counts its work and catches a reset engine."""

from __future__ import annotations

import pytest

from miles.engine.generation import EngineHandle, EngineReset
from miles.engine.protocol import GenerateOutput, GenerateRequest, SamplingParams


class FixedVersionClient:
    """Answers each request with two tokens, labelled with ``version``."""

    def __init__(self, version: int) -> None:
        self.version = version

    async def generate(self, requests: list[GenerateRequest]) -> list[GenerateOutput]:
        return [
            GenerateOutput(
                rid=r.rid,
                output_ids=[5, 6],
                text="ab",
                output_token_logprobs=[-1.0, -2.0],
                finish_reason="length",
                weight_version=self.version,
                prompt_tokens=len(r.input_ids),
                completion_tokens=2,
            )
            for r in requests
        ]


def requests(count: int) -> list[GenerateRequest]:
    params = SamplingParams(max_new_tokens=2)
    return [
        GenerateRequest(rid=str(i), input_ids=[1], sampling_params=params) for i in range(count)
    ]


async def test_the_handle_counts_tokens_and_seconds() -> None:
    handle = EngineHandle(FixedVersionClient(3), None, "e0", weight_version=3)  # type: ignore[arg-type]
    await handle.generate(requests(3))
    await handle.generate(requests(1))
    assert handle.tokens == 8
    assert handle.seconds >= 0


async def test_outputs_under_older_weights_than_given_mean_the_engine_reset() -> None:
    handle = EngineHandle(FixedVersionClient(0), None, "e0", weight_version=3)  # type: ignore[arg-type]
    with pytest.raises(EngineReset, match="e0 generated at version 0, but was given 3"):
        await handle.generate(requests(1))
    newer = EngineHandle(FixedVersionClient(4), None, "e1", weight_version=3)  # type: ignore[arg-type]
    assert len(await newer.generate(requests(1))) == 1  # a push ran ahead: fine

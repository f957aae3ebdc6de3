"""``SGLangClient`` against a real ``sglang.launch_server`` (GPU only; skipped elsewhere).

Needs the ``sglang`` package, a CUDA GPU and a small Hugging Face model already on disk, named by
``MILES_SGLANG_MODEL`` (nothing is downloaded). ``MILES_SGLANG_ARGS`` adds server arguments
(e.g. ``--mem-fraction-static 0.5``). The NCCL weight-broadcast test needs a second GPU for the
trainer's rank, since NCCL does not put two ranks on one device.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import torch

from miles.engine.protocol import GenerateRequest, SamplingParams
from miles.engine.sglang_client import (
    SGLangClient,
    SGLangHTTPError,
    broadcast_weights,
    join_weight_update_group,
)
from miles.engine.sglang_launcher import SGLangServerProcess, free_port
from miles.engine.shared_tensors import serialize_named_tensors

pytest.importorskip("sglang")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif("MILES_SGLANG_MODEL" not in os.environ, reason="set MILES_SGLANG_MODEL"),
]
PROMPT = [1, 450, 7483, 310, 3444, 338]  # any ids below the model's vocabulary size


@pytest.fixture(scope="module")
def server() -> Iterator[SGLangServerProcess]:
    process = SGLangServerProcess(
        "sglang",
        os.environ["MILES_SGLANG_MODEL"],
        server_args=shlex.split(os.environ.get("MILES_SGLANG_ARGS", "")),
        env={"CUDA_VISIBLE_DEVICES": "0"},
        startup_timeout_seconds=900,
    )
    process.start()
    yield process
    process.stop()


@pytest.fixture
async def engine(server: SGLangServerProcess) -> AsyncIterator[SGLangClient]:
    async with SGLangClient(server.base_url) as client:
        yield client


def request(rid: str, **params: object) -> GenerateRequest:
    return GenerateRequest(rid=rid, input_ids=PROMPT, sampling_params=SamplingParams(**params))


async def test_generate_returns_tokens_logprobs_and_version(engine: SGLangClient) -> None:
    requests = [
        request("greedy", max_new_tokens=8, temperature=0.0),
        request("sampled", max_new_tokens=8, sampling_seed=7),
        request("short", max_new_tokens=2, sampling_seed=1),
    ]
    outputs = await engine.generate(requests)
    for req, out in zip(requests, outputs, strict=True):
        assert out.rid == req.rid
        assert len(out.output_ids) == len(out.output_token_logprobs) == out.completion_tokens
        assert out.completion_tokens <= req.sampling_params.max_new_tokens
        assert all(lp <= 0 for lp in out.output_token_logprobs)
        assert (out.prompt_tokens, out.weight_version) == (len(PROMPT), 0)
    (again,) = await engine.generate([requests[0]])
    assert again.output_ids == outputs[0].output_ids


async def test_pause_holds_requests_until_continue(engine: SGLangClient) -> None:
    await engine.pause_generation(mode="in_place")
    try:
        pending = asyncio.ensure_future(engine.generate([request("held", max_new_tokens=4)]))
        await asyncio.sleep(1.0)
        assert not pending.done()
    finally:
        await engine.continue_generation()
    (held,) = await asyncio.wait_for(pending, 60)
    assert held.finish_reason in ("stop", "length")


async def test_update_weights_from_disk_sets_the_version(engine: SGLangClient) -> None:
    version = await engine.weight_version() + 1
    await engine.update_weights_from_disk(os.environ["MILES_SGLANG_MODEL"], version)
    assert await engine.weight_version() == version
    (out,) = await engine.generate([request("after", max_new_tokens=2)])
    assert out.weight_version == version
    await engine.flush_cache()
    assert await engine.health()


async def test_bad_request_is_a_clear_error(engine: SGLangClient) -> None:
    with pytest.raises(SGLangHTTPError, match="HTTP 400"):
        await engine.update_weights_from_disk("/no/such/model", 99)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the trainer's rank needs a 2nd GPU")
async def test_nccl_broadcast_reaches_the_server(
    engine: SGLangClient, server: SGLangServerProcess
) -> None:
    """This process is the trainer (rank 0, on cuda:1); the server joins as rank 1."""
    config = Path(os.environ["MILES_SGLANG_MODEL"], "config.json")
    hidden_size = int(json.loads(config.read_text())["hidden_size"])
    group = await join_weight_update_group([engine], "127.0.0.1", free_port(), "nccl-test")
    norm = torch.full((hidden_size,), 0.5, device="cuda:1", dtype=torch.bfloat16)
    version = await engine.weight_version() + 1
    await broadcast_weights([engine], group, {"model.norm.weight": norm}, "nccl-test", version)
    async with aiohttp.ClientSession() as session:
        query = {"name": "model.norm.weight", "truncate_size": 4}
        answer = await session.post(server.base_url + "/get_weights_by_name", json=query)
        assert await answer.json() == pytest.approx([0.5] * 4)
    assert await engine.weight_version() == version
    await engine.destroy_weights_update_group("nccl-test")


async def test_cuda_ipc_handles_reach_the_server(
    engine: SGLangClient, server: SGLangServerProcess
) -> None:
    """The colocated path: this process holds a tensor on the server's GPU (cuda:0) and sends
    only its CUDA IPC handle; the server maps it and loads it."""
    config = Path(os.environ["MILES_SGLANG_MODEL"], "config.json")
    hidden_size = int(json.loads(config.read_text())["hidden_size"])
    norm = torch.full((hidden_size,), 0.25, device="cuda:0", dtype=torch.bfloat16)
    version = await engine.weight_version() + 1
    payload = serialize_named_tensors({"model.norm.weight": norm})
    await engine.update_weights_from_tensor([payload], version)
    async with aiohttp.ClientSession() as session:
        query = {"name": "model.norm.weight", "truncate_size": 4}
        answer = await session.post(server.base_url + "/get_weights_by_name", json=query)
        assert await answer.json() == pytest.approx([0.25] * 4)
    assert await engine.weight_version() == version

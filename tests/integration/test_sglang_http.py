"""``SGLangClient`` against the CPU SGLang stand-in, a real server process on a loopback port.

The server is started by ``SGLangServerProcess`` (so the launcher is exercised too) and decodes
request bodies strictly, so every call here also checks that the client sends only fields
SGLang defines.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from miles.engine.protocol import GenerateRequest, SamplingParams
from miles.engine.sglang_client import (
    SGLangClient,
    SGLangConnectionError,
    SGLangHTTPError,
    broadcast_weights,
    join_weight_update_group,
)
from miles.engine.sglang_launcher import ServerStartError, SGLangServerProcess
from miles.engine.sglang_server import tensor_checksum
from miles.engine.shared_tensors import serialize_named_tensors
from miles.engine.transformers_engine import TransformersEngine
from miles.runtime.embedded import free_port
from miles.shards import WEIGHTS_FILE

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[SGLangServerProcess]:
    process = SGLangServerProcess(
        "local", tiny_model, server_args=["--threads", "1"], startup_timeout_seconds=120
    )
    process.start()
    yield process
    assert process.stop() == 0, process.log_tail()  # SIGTERM is a clean shutdown


@pytest.fixture
async def engine(server: SGLangServerProcess) -> AsyncIterator[SGLangClient]:
    async with SGLangClient(server.base_url, timeout_seconds=60) as client:
        yield client


@pytest.fixture(scope="module")
def encode(tiny_model: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    return lambda text: list(tokenizer.encode(text, add_special_tokens=False))


def request(rid: str, input_ids: list[int], **params: object) -> GenerateRequest:
    return GenerateRequest(rid=rid, input_ids=input_ids, sampling_params=SamplingParams(**params))


async def restore(engine: SGLangClient, tiny_model: Path) -> None:
    """Back to the original weights, under a new version: versions only grow."""
    await engine.update_weights_from_disk(str(tiny_model), await engine.weight_version() + 1)


async def test_generate_over_http_equals_the_engine_in_process(
    engine: SGLangClient, tiny_model: Path, encode
) -> None:
    requests = [
        request("sampled", encode("12+34="), max_new_tokens=6, sampling_seed=3),
        request("greedy", encode("5+5="), max_new_tokens=4, temperature=0.0),
        request(
            "filtered",
            encode("7"),
            max_new_tokens=2,
            temperature=0.7,
            top_p=0.9,
            top_k=5,
            sampling_seed=4,
        ),
    ]
    outputs = await engine.generate(requests)
    version = await engine.weight_version()
    local = TransformersEngine(str(tiny_model), threads=torch.get_num_threads())
    expected = local.generate(requests)
    for req, out, exp in zip(requests, outputs, expected, strict=True):
        assert out.rid == req.rid
        assert out.output_ids == exp.output_ids
        assert out.output_token_logprobs == pytest.approx(exp.output_token_logprobs, abs=1e-4)
        assert (out.text, out.finish_reason) == (exp.text, exp.finish_reason)
        assert len(out.output_token_logprobs) == out.completion_tokens == len(out.output_ids)
        assert out.completion_tokens <= req.sampling_params.max_new_tokens
        assert all(lp <= 0 and math.isfinite(lp) for lp in out.output_token_logprobs)
        assert (out.prompt_tokens, out.weight_version) == (len(req.input_ids), version)


async def test_seed_reproduces_tokens_and_stop_string_ends_them(
    engine: SGLangClient, encode
) -> None:
    prompt = encode("3+4=")
    draws = await engine.generate(
        [request(f"seed-{s}", prompt, max_new_tokens=8, sampling_seed=s) for s in range(16)]
    )
    # Each token of this tokenizer is one character: a stop string is one output token.
    seed, first = next((s, o) for s, o in enumerate(draws) if len(o.text) >= 3)
    (again,) = await engine.generate(
        [request("again", prompt, max_new_tokens=8, sampling_seed=seed)]
    )
    assert again.output_ids == first.output_ids  # float bits may differ with the batch size
    assert again.output_token_logprobs == pytest.approx(first.output_token_logprobs, abs=1e-5)
    stop = first.text[2]
    cut = first.text.index(stop) + 1
    (stopped,) = await engine.generate(
        [request("stopped", prompt, max_new_tokens=8, sampling_seed=seed, stop=[stop])]
    )
    assert stopped.finish_reason == "stop"
    assert stopped.text == first.text[:cut]  # the stop string is kept (no_stop_trim)
    assert stopped.output_ids == first.output_ids[: len(stopped.output_ids)]


async def test_pause_holds_new_requests_until_continue(engine: SGLangClient, encode) -> None:
    await engine.pause_generation()
    try:
        pending = asyncio.ensure_future(
            engine.generate([request("held", encode("1+1="), max_new_tokens=3, sampling_seed=0)])
        )
        await asyncio.sleep(0.5)
        assert not pending.done()
        assert await engine.health()  # paused is healthy
    finally:
        await engine.continue_generation()
    (held,) = await asyncio.wait_for(pending, 30)
    assert held.finish_reason in ("stop", "length")


async def test_abort_answers_a_waiting_request_as_aborted(engine: SGLangClient, encode) -> None:
    await engine.pause_generation(mode="in_place")
    try:
        pending = asyncio.ensure_future(
            engine.generate([request("doomed", encode("2+2="), max_new_tokens=3)])
        )
        await asyncio.sleep(0.3)
        await engine.abort("doomed")
        (doomed,) = await asyncio.wait_for(pending, 10)
    finally:
        await engine.continue_generation()
    assert (doomed.finish_reason, doomed.output_ids) == ("abort", [])


async def test_update_weights_from_disk_changes_outputs_and_version(
    engine: SGLangClient, tiny_model: Path, encode, tmp_path: Path
) -> None:
    greedy = [request("greedy", encode("45+67="), max_new_tokens=5, temperature=0.0)]
    (before,) = await engine.generate(greedy)
    generator = torch.Generator().manual_seed(0)
    state = load_file(tiny_model / WEIGHTS_FILE)
    save_file(
        {n: t + 0.5 * torch.randn(t.shape, generator=generator) for n, t in state.items()},
        tmp_path / WEIGHTS_FILE,
    )
    version = await engine.weight_version() + 1
    await engine.update_weights_from_disk(str(tmp_path), version)
    try:
        (after,) = await engine.generate(greedy)
        assert after.weight_version == version == await engine.weight_version()
        assert after.output_token_logprobs != pytest.approx(before.output_token_logprobs)
    finally:
        await restore(engine, tiny_model)
    (restored,) = await engine.generate(greedy)
    assert restored.output_token_logprobs == pytest.approx(before.output_token_logprobs)


async def test_flush_cache_and_health(engine: SGLangClient) -> None:
    await engine.flush_cache()
    assert await engine.health()


async def test_bad_requests_get_clear_errors(
    engine: SGLangClient, server: SGLangServerProcess, tmp_path: Path
) -> None:
    with pytest.raises(SGLangHTTPError, match=r"HTTP 400.*outside the vocabulary") as error:
        await engine.generate([request("bad", [1, 10_000])])
    assert error.value.status == 400
    with pytest.raises(SGLangHTTPError, match=f"HTTP 400.*{tmp_path} holds no weights"):
        await engine.update_weights_from_disk(str(tmp_path), 99)
    async with aiohttp.ClientSession() as session:  # a field SGLang has but this server lacks
        answer = await session.post(server.base_url + "/generate", json={"text": "1+1="})
        assert answer.status == 400
        assert "unknown field `text`" in (await answer.json())["error"]["message"]
    closed = SGLangClient(f"http://127.0.0.1:{free_port()}", retries=2, backoff_seconds=0.01)
    async with closed:
        with pytest.raises(SGLangConnectionError, match="after 3 attempt"):
            await closed.weight_version()
        assert not await closed.health()


async def test_weights_broadcast_over_a_gloo_group_reach_the_server(
    engine: SGLangClient, server: SGLangServerProcess, tiny_model: Path
) -> None:
    """The trainer's side (this process, rank 0) against the server (rank 1), as with SGLang."""
    group_name = "test-sync"
    group = await join_weight_update_group(
        [engine], "127.0.0.1", free_port(), group_name, backend="gloo"
    )
    sent = random_weights(tiny_model, ("layers.0.", "model.norm.weight"), seed=1)
    version = await engine.weight_version() + 1
    await broadcast_weights([engine], group, sent, group_name, version)
    try:
        await assert_served(server, sent, version)
        unknown = {"no.such.weight": torch.zeros(2)}
        with pytest.raises(SGLangHTTPError, match="unknown names"):
            await broadcast_weights([engine], group, unknown, group_name, version + 1)
    finally:
        await engine.destroy_weights_update_group(group_name)
        await restore(engine, tiny_model)


async def test_weights_by_shared_memory_handle_reach_the_server(
    engine: SGLangClient, server: SGLangServerProcess, tiny_model: Path, tmp_path: Path
) -> None:
    """`/update_weights_from_tensor` as a colocated trainer calls it: handles to this process's
    memory (CUDA IPC on GPUs), which the server maps, checks and copies into its model."""
    sent = random_weights(tiny_model, ("layers.1.",), seed=2)
    version = await engine.weight_version() + 1
    await engine.update_weights_from_tensor([serialize_named_tensors(sent)], version)
    try:
        await assert_served(server, sent, version)
        misfit = {next(iter(sent)): torch.zeros(3)}
        with pytest.raises(SGLangHTTPError, match="wrong shapes"):
            await engine.update_weights_from_tensor([serialize_named_tensors(misfit)], 10**6)
        marker = tmp_path / "ran"
        code = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()  # os.system, protocol 0
        with pytest.raises(SGLangHTTPError, match="refusing to load"):
            await engine.update_weights_from_tensor([code], 10**6)
        assert not marker.exists()
        assert await engine.weight_version() == version  # nothing was loaded by either
    finally:
        await restore(engine, tiny_model)


def random_weights(model: Path, names: tuple[str, ...], seed: int) -> dict[str, torch.Tensor]:
    """New values for the model's weights whose names contain one of ``names``."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(tensor.shape, generator=generator)
        for name, tensor in load_file(model / WEIGHTS_FILE).items()
        if any(part in name for part in names)
    }


async def assert_served(
    server: SGLangServerProcess, sent: dict[str, torch.Tensor], version: int
) -> None:
    """The server holds exactly ``sent`` (per-tensor sha256) under ``version``."""
    async with aiohttp.ClientSession() as session:
        answer = await session.get(server.base_url + "/miles/weights_checksum")
        served = await answer.json()
    assert served["weight_version"] == str(version)
    assert {n: served["checksums"][n] for n in sent} == {
        n: tensor_checksum(t) for n, t in sent.items()
    }


def test_launcher_reports_a_server_that_dies_with_its_log(tmp_path: Path) -> None:
    process = SGLangServerProcess("local", tmp_path / "no-model", startup_timeout_seconds=60)
    with pytest.raises(ServerStartError, match=r"exited with code \d+(.|\n)*last 40 lines"):
        process.start()
    assert not process.is_running()


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def test_server_dies_with_the_process_that_started_it(tiny_model: Path) -> None:
    """Whatever kills the launching process (a Ray actor killed, an OOM kill), no orphan."""
    script = (
        "import time\n"
        "from miles.engine.sglang_launcher import SGLangServerProcess\n"
        f"server = SGLangServerProcess('local', {str(tiny_model)!r})\n"
        "print(server.start(), server.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    launcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert launcher.stdout is not None
    base_url, pid = launcher.stdout.readline().split()
    try:
        assert answers(base_url + "/health")
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 30
        while answers(base_url + "/health") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not answers(base_url + "/health"), "the server outlived its launcher"
    finally:
        launcher.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(pid), signal.SIGKILL)


def test_server_started_by_a_ray_actor_dies_with_the_actor(
    ray_cluster: str, tiny_model: Path
) -> None:
    import ray

    actor = (
        ray.remote(SGLangServerProcess)
        .options(num_cpus=0)
        .remote("local", tiny_model, server_args=["--threads", "1"], startup_timeout_seconds=120)
    )
    base_url = ray.get(actor.start.remote(), timeout=180)
    assert answers(base_url + "/health")
    ray.kill(actor)
    deadline = time.monotonic() + 30
    while answers(base_url + "/health") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not answers(base_url + "/health"), "the server outlived the actor that started it"

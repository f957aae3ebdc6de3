"""One contract for every ``EngineClient``: what the rollout may rely on, whatever the engine.

Run against each implementation:

- ``in_process``: ``InProcessClient`` over a ``TransformersEngine`` in this process;
- ``local_server``: ``SGLangClient`` over HTTP to miles' CPU SGLang server, a real server
  process (``integration``: run it under the heavy-test lock);
- ``sglang``: ``SGLangClient`` against a real ``sglang.launch_server`` (``gpu``: needs the
  ``sglang`` package, a CUDA GPU and ``MILES_SGLANG_MODEL``, as in ``tests/gpu``).

Each engine starts on ``base`` weights; ``other`` is the same model with its norm weights
perturbed, saved like a Hugging Face checkpoint, so loading it must change what is generated.
Versions only grow, and the engines live for the whole module: each test reads the version the
engine holds and counts on from there.
"""

from __future__ import annotations

import asyncio
import math
import os
import shlex
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer

from miles.engine.in_process import InProcessClient
from miles.engine.protocol import EngineClient, GenerateOutput, GenerateRequest, SamplingParams
from miles.engine.sglang_client import SGLangClient
from miles.engine.sglang_launcher import SGLangServerProcess
from miles.engine.transformers_engine import TransformersEngine

SGLANG_PROMPT = [1, 450, 7483, 310, 3444, 338]  # any ids below a real model's vocabulary size


@dataclass
class Backend:
    """One implementation under test: how to connect to its engine, and what it serves."""

    connect: Callable[[], EngineClient]
    prompt: list[int]
    base: Path
    other: Path


def perturbed_copy(model: Path, target: Path) -> Path:
    """``model`` with deterministic noise added to every norm weight: other outputs, same names."""
    target.mkdir(parents=True)
    noise = torch.Generator().manual_seed(0)
    for source in model.iterdir():
        if source.suffix != ".safetensors":
            (target / source.name).symlink_to(source.resolve())
            continue
        with safe_open(source, framework="pt") as weights:
            metadata = weights.metadata()
            tensors = {name: weights.get_tensor(name) for name in weights.keys()}  # noqa: SIM118
        for name, tensor in tensors.items():
            if name.endswith("norm.weight"):
                delta = torch.randn(tensor.shape, generator=noise) * 0.5
                tensors[name] = (tensor.float() + delta).to(tensor.dtype)
        save_file(tensors, target / source.name, metadata=metadata)
    return target


def _local_backend(tiny_model: Path, other: Path) -> Iterator[Backend]:
    process = SGLangServerProcess(
        "local", tiny_model, server_args=["--threads", "1"], startup_timeout_seconds=120
    )
    process.start()
    try:
        tokenizer = AutoTokenizer.from_pretrained(tiny_model)
        prompt = list(tokenizer.encode("12+34=", add_special_tokens=False))
        yield Backend(
            lambda: SGLangClient(process.base_url, timeout_seconds=60), prompt, tiny_model, other
        )
    finally:
        assert process.stop() == 0, process.log_tail()


def _sglang_backend(tmp_path: Path) -> Iterator[Backend]:
    pytest.importorskip("sglang")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if "MILES_SGLANG_MODEL" not in os.environ:
        pytest.skip("set MILES_SGLANG_MODEL")
    model = Path(os.environ["MILES_SGLANG_MODEL"])
    process = SGLangServerProcess(
        "sglang",
        model,
        server_args=shlex.split(os.environ.get("MILES_SGLANG_ARGS", "")),
        env={"CUDA_VISIBLE_DEVICES": "0"},
        startup_timeout_seconds=900,
    )
    other = perturbed_copy(model, tmp_path / "other")
    process.start()
    try:
        yield Backend(lambda: SGLangClient(process.base_url), SGLANG_PROMPT, model, other)
    finally:
        process.stop()
        shutil.rmtree(other, ignore_errors=True)


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("in_process"),
        pytest.param("local_server", marks=pytest.mark.integration),
        pytest.param("sglang", marks=pytest.mark.gpu),
    ],
)
def backend(
    request: pytest.FixtureRequest, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    tmp_path = tmp_path_factory.mktemp(request.param)
    if request.param == "sglang":
        yield from _sglang_backend(tmp_path)
        return
    other = perturbed_copy(tiny_model, tmp_path / "other")
    if request.param == "local_server":
        yield from _local_backend(tiny_model, other)
        return
    # The engine's thread count is process-wide: keep what the test session uses.
    engine = TransformersEngine(str(tiny_model), threads=torch.get_num_threads())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt = list(tokenizer.encode("12+34=", add_special_tokens=False))
    yield Backend(lambda: InProcessClient(engine), prompt, tiny_model, other)


@pytest.fixture
async def client(backend: Backend) -> AsyncIterator[EngineClient]:
    client = backend.connect()
    yield client
    await client.continue_generation()  # a failed pause test must not hold the next one
    await client.aclose()


def request(rid: str, prompt: list[int], **params: object) -> GenerateRequest:
    return GenerateRequest(rid=rid, input_ids=prompt, sampling_params=SamplingParams(**params))


async def generate_one(client: EngineClient, req: GenerateRequest) -> GenerateOutput:
    (output,) = await client.generate([req])
    return output


async def test_generate_answers_each_request_in_order(
    client: EngineClient, backend: Backend
) -> None:
    prompt = backend.prompt
    requests = [
        request("greedy", prompt, max_new_tokens=8, temperature=0.0),
        request("sampled", prompt, max_new_tokens=8, sampling_seed=7),
        request("short", prompt, max_new_tokens=2, sampling_seed=1),
    ]
    version = await client.weight_version()
    outputs = await client.generate(requests)
    assert [o.rid for o in outputs] == ["greedy", "sampled", "short"]
    for req, out in zip(requests, outputs, strict=True):
        assert 1 <= len(out.output_ids) <= req.sampling_params.max_new_tokens
        assert len(out.output_token_logprobs) == len(out.output_ids) == out.completion_tokens
        assert all(math.isfinite(lp) and lp <= 0 for lp in out.output_token_logprobs)
        assert out.finish_reason in ("stop", "length")
        assert (out.prompt_tokens, out.weight_version) == (len(prompt), version)
    assert await client.generate([]) == []


async def test_logprobs_only_when_asked(client: EngineClient, backend: Backend) -> None:
    req = request("quiet", backend.prompt, max_new_tokens=3, temperature=0.0)
    req.return_logprob = False
    out = await generate_one(client, req)
    assert out.output_ids and out.output_token_logprobs == []


async def test_a_seeded_request_is_reproducible(client: EngineClient, backend: Backend) -> None:
    req = request("seeded", backend.prompt, max_new_tokens=8, sampling_seed=1234)
    first, again = await generate_one(client, req), await generate_one(client, req)
    assert again.output_ids == first.output_ids
    assert again.output_token_logprobs == pytest.approx(first.output_token_logprobs, abs=1e-4)


async def test_finish_reasons(client: EngineClient, backend: Backend) -> None:
    greedy = request("greedy", backend.prompt, max_new_tokens=8, temperature=0.0)
    first = (await generate_one(client, greedy)).output_ids[0]
    stopped = await generate_one(
        client,
        request("stop", backend.prompt, max_new_tokens=8, temperature=0.0, stop_token_ids=[first]),
    )
    assert (stopped.output_ids, stopped.finish_reason) == ([first], "stop")
    cut = await generate_one(client, request("cut", backend.prompt, max_new_tokens=1, top_k=1))
    assert cut.output_ids == [first]
    if first != AutoTokenizer.from_pretrained(backend.base).eos_token_id:
        assert cut.finish_reason == "length"


async def test_update_weights_from_disk_bumps_the_version_and_changes_outputs(
    client: EngineClient, backend: Backend
) -> None:
    req = request("probe", backend.prompt, max_new_tokens=6, sampling_seed=99)
    version = await client.weight_version()
    before = await generate_one(client, req)

    await client.update_weights_from_disk(str(backend.other), version + 1)
    assert await client.weight_version() == version + 1
    changed = await generate_one(client, req)
    assert changed.weight_version == version + 1
    assert (changed.output_ids, changed.output_token_logprobs) != (
        before.output_ids,
        before.output_token_logprobs,
    )

    await client.update_weights_from_disk(str(backend.base), version + 2)
    restored = await generate_one(client, req)
    assert restored.weight_version == await client.weight_version() == version + 2
    assert restored.output_ids == before.output_ids
    assert restored.output_token_logprobs == pytest.approx(before.output_token_logprobs, abs=1e-4)


async def test_pause_holds_new_requests_until_continue(
    client: EngineClient, backend: Backend
) -> None:
    await client.pause_generation()
    try:
        req = request("held", backend.prompt, max_new_tokens=4, temperature=0.0)
        pending = asyncio.ensure_future(generate_one(client, req))
        await asyncio.sleep(0.5)
        assert not pending.done()
    finally:
        await client.continue_generation()
    held = await asyncio.wait_for(pending, 60)
    assert held.finish_reason in ("stop", "length")  # it came after the pause: not aborted


async def test_health(client: EngineClient) -> None:
    assert await client.health() is True

"""Reward models for real: the Hugging Face classifier on a local Ray actor (killed and restarted
under it), served over HTTP by ``python -m miles.scoring.serve_reward_model`` to the HTTP
scorer, and both in the reward service, on a tiny model built from a config."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import ray

from miles import events
from miles.config import HTTPRewardModel, MilesConfig, load_config
from miles.runtime import embedded
from miles.runtime.embedded import free_port
from miles.runtime.subjects import BUFFER_CONSUMER
from miles.scoring import Failure, Limits, Scorer
from miles.scoring.hf_model import HFScorer, SequenceClassifier
from miles.scoring.http_model import HTTPScorer
from miles.scoring.models import close_models, reward_models
from services.reward.main import main as reward_main
from tests.integration.test_services import Harness, _config, _generated, _recipe, _sample
from tests.unit.scoring.test_reward_models import PAIRS, build_reward_model, make_sample

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_reward_model(tmp_path_factory.mktemp("reward-model"), "gpt2")


@pytest.fixture(scope="module")
def expected(reward_model_dir: Path) -> list[float]:
    """The rewards of ``PAIRS`` computed in this process, without Ray or HTTP."""
    prompts, completions = zip(*PAIRS, strict=True)
    return SequenceClassifier(str(reward_model_dir), batch_size=1).score(prompts, completions)


def group() -> list[Any]:
    return [make_sample(i, prompt, completion) for i, (prompt, completion) in enumerate(PAIRS)]


def hf_config(reward_model_dir: Path, *overrides: str) -> MilesConfig:
    model = f'kind="hf", name="rm", path="{reward_model_dir}", batch_size=4, num_cpus=0.5'
    extra = "".join(f", {override}" for override in overrides)
    return load_config(overrides=[f"reward.models=[{{{model}{extra}}}]"])


async def score(scorer: Scorer, limits: Limits) -> list[Any]:
    """A call that must come back: a hang fails the test instead of stalling it."""
    return await asyncio.wait_for(scorer.score(group(), limits), 120)


async def kill(actor: Any) -> None:
    """Kill the actor's worker (Ray restarts it) and wait until calls see it gone."""
    ray.kill(actor, no_restart=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            await actor.ready.remote()
        except ray.exceptions.ActorUnavailableError:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the actor still answers 30s after ray.kill")


async def test_hf_model_scores_a_group_on_a_ray_actor_and_survives_its_death(
    ray_cluster: str, reward_model_dir: Path, expected: list[float]
) -> None:
    [scorer] = reward_models(hf_config(reward_model_dir))
    assert isinstance(scorer, HFScorer)
    limits = Limits(4, 60.0)
    try:
        assert await score(scorer, limits) == pytest.approx(expected, abs=1e-6)
        concurrent = await asyncio.gather(*(score(scorer, limits) for _ in range(3)))
        for outcomes in concurrent:
            assert outcomes == pytest.approx(expected, abs=1e-6)

        # Killed between calls: Ray starts it again, and the next call waits for the model to
        # load again instead of failing its samples.
        await kill(scorer.actor)
        assert await score(scorer, limits) == pytest.approx(expected, abs=1e-6)

        # Killed under a call (if it is still running): the call runs again once reloaded.
        many = group() * 50
        interrupted = asyncio.ensure_future(scorer.score(many, limits))
        await asyncio.sleep(0.05)
        ray.kill(scorer.actor, no_restart=False)
        outcomes = await asyncio.wait_for(interrupted, 120)
        assert outcomes == pytest.approx(expected * 50, abs=1e-6)
        assert await score(scorer, limits) == pytest.approx(expected, abs=1e-6)
    finally:
        await close_models([scorer])


async def test_hf_model_that_cannot_load_fails_the_samples_with_the_reason(
    ray_cluster: str, tmp_path: Path
) -> None:
    [scorer] = reward_models(hf_config(tmp_path / "missing"))
    try:
        outcomes = await score(scorer, Limits(4, 60.0))
    finally:
        await close_models([scorer])
    [error] = {o.error for o in outcomes}
    assert error == (
        f"rm: its Ray actor died: miles.models.ModelError: the reward model's path: "
        f"{tmp_path / 'missing'} does not exist"
    )
    assert "\n" not in error


async def test_hf_model_whose_actor_cannot_start_fails_after_load_timeout(
    ray_cluster: str, reward_model_dir: Path
) -> None:
    """A GPU this cluster does not have: the actor never starts, and scoring does not hang."""
    config = hf_config(reward_model_dir, "num_gpus=1", "load_timeout_seconds=1")
    [scorer] = reward_models(config)
    start = time.monotonic()
    try:
        outcomes = await score(scorer, Limits(4, 60.0))
    finally:
        await close_models([scorer])
    assert time.monotonic() - start < 10
    error = "rm: the model was not loaded within 1s (load_timeout_seconds)"
    assert outcomes == [Failure(error)] * len(PAIRS)


@pytest.fixture(scope="module")
def served(reward_model_dir: Path) -> Iterator[str]:
    """``python -m miles.scoring.serve_reward_model`` on a free port; its /score URL."""
    port = free_port()
    command = [sys.executable, "-m", "miles.scoring.serve_reward_model"]
    arguments = ["--model", str(reward_model_dir), "--port", str(port), "--batch-size", "4"]
    server = subprocess.Popen([*command, *arguments])
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", server)
        yield f"http://127.0.0.1:{port}/score"
    finally:
        server.terminate()
        server.wait(30)


def wait_healthy(url: str, server: subprocess.Popen[bytes]) -> None:
    async def poll() -> None:
        async with aiohttp.ClientSession() as session:
            while server.poll() is None:
                try:
                    async with session.get(url) as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError(f"the reward model server exited with {server.returncode}")

    asyncio.run(asyncio.wait_for(poll(), 120))


async def test_served_model_answers_the_http_scorer(served: str, expected: list[float]) -> None:
    scorer = HTTPScorer(HTTPRewardModel(name="served", url=served))
    try:
        assert await score(scorer, Limits(4, 30.0)) == pytest.approx(expected, abs=1e-6)
    finally:
        await scorer.close()


async def test_served_model_rejects_a_malformed_request_with_400(served: str) -> None:
    async with aiohttp.ClientSession() as session:
        for body, reason in [
            ({"prompts": ["a", "b"], "completions": ["c"]}, "2 prompts for 1 completions"),
            ({"prompts": ["a"]}, '"completions" must be a list of strings'),
            ([1, 2], 'expected a JSON object {"prompts": [...], "completions": [...]}'),
        ]:
            async with session.post(served, json=body) as response:
                assert (response.status, await response.text()) == (400, reason)
        async with session.post(served, data=b"not json") as response:
            assert response.status == 400


async def test_reward_service_weighs_both_models_with_the_recipes_function(
    nats_server: embedded.Server,
    redis_server: embedded.Server,
    ray_cluster: str,
    reward_model_dir: Path,
    served: str,
    tmp_path: Path,
) -> None:
    models = [
        f'{{kind="hf", name="rm", path="{reward_model_dir}", num_cpus=0.5}}',
        f'{{kind="http", name="served", url="{served}"}}',
    ]
    config = _config(
        nats_server,
        redis_server,
        f'infra.ray_address="{ray_cluster}"',
        f"reward.models=[{', '.join(models)}]",
        "reward.weights={rm=0.5, served=-2.0}",
    )
    h = await Harness.open(config, _recipe(tmp_path), tmp_path)
    try:
        h.start("reward", reward_main)
        samples = [_sample("t0", 0, text="3"), _sample("t0", 1, text="4")]  # 1+2= 3 is exact
        await h.publish(h.subjects.generated, _generated(h, "t0", samples))
        scored = await h.bus.pull("scored", BUFFER_CONSUMER)
        [group] = await h.collect(scored, events.ScoredGroup, 1, timeout=120)
    finally:
        await h.close()
    rm = SequenceClassifier(str(reward_model_dir)).score(["1+2="] * 2, ["3", "4"])
    exact = [1.0, 0.0]
    expected = [e + 0.5 * r - 2.0 * r for e, r in zip(exact, rm, strict=True)]
    assert [(s.failed, s.error) for s in group.samples] == [(False, "")] * 2
    assert [s.reward for s in group.samples] == pytest.approx(expected, abs=1e-6)

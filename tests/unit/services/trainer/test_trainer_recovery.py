"""What a fresh or restarted trainer actor is given to stand at the latest committed step, and
what the service does when the actor lost its weights. The actor, the blob store, the message and
the manifests are fakes that record the calls they get."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from ray.exceptions import RayActorError

from miles.config import TrainerConfig
from miles.runtime.checkpoint import Manifest
from services.trainer.actor import StaleWeights
from services.trainer.position import FullState, ResumeState
from services.trainer.recovery import LOST_WEIGHTS, recover, resume, trainer_resources


@dataclass
class Calls:
    made: list[tuple[Any, ...]] = field(default_factory=list)


class Method:
    """An actor method as Ray exposes it: ``method.remote(*args)`` is awaited for its result."""

    def __init__(self, calls: Calls, name: str, result: Any = None) -> None:
        self.calls, self.name, self.result = calls, name, result

    def remote(self, *args: Any) -> Any:
        self.calls.made.append((self.name, *args))

        async def answer() -> Any:
            return self.result

        return answer()


class Actor:
    def __init__(self, calls: Calls) -> None:
        self.load_weights = Method(calls, "load_weights")
        self.state_file_name = Method(calls, "state_file_name", "state.sha256")
        self.load_state = Method(calls, "load_state")
        self.set_rng_state = Method(calls, "set_rng_state")


class Blobs:
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def get_dir(self, uri: str, sha256: str, checked: str | None = None) -> Path:
        self.calls.made.append(("get_dir", uri, sha256, checked))
        return Path("/local") / uri.rsplit("/", 1)[-1]


class Msg:
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def nak(self, delay: float | None = None) -> None:
        self.calls.made.append(("nak",))


def manifest(step: int, state_step: int | None) -> Manifest:
    return Manifest(
        run_id="r",
        step=step,
        policy_version=step,
        weights_uri=f"file:///blobs/weights/v{step}-a",
        weights_sha256="w" * 64,
        state_uri=None if state_step is None else f"file:///blobs/state/s{state_step}-a",
        state_sha256=None if state_step is None else "s" * 64,
        state_step=state_step or 0,
        batch_ids=[f"b{step}"],
        task_ids=[],
        sample_ids=[],
        dataset_cursor=0,
        rng_state=f"rng{step}",
        config_hash="c",
        samples=0,
        min_sample_version=0,
        reward_mean=0.0,
        metrics={"loss": 0.0},
        seconds={},
    )


async def test_a_new_run_loads_nothing() -> None:
    calls = Calls()
    assert await resume(Actor(calls), Blobs(calls), None) == ResumeState()
    assert calls.made == []


async def test_resume_loads_weights_then_the_full_state_checked_by_its_file_then_the_rng(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "miles.trainer")
    calls = Calls()
    position = await resume(Actor(calls), Blobs(calls), manifest(4, state_step=4))
    assert position == ResumeState(4, FullState("file:///blobs/state/s4-a", "s" * 64, 4))
    assert calls.made == [
        ("get_dir", "file:///blobs/weights/v4-a", "w" * 64, None),  # the weights' layout
        ("load_weights", "/local/v4-a", 4),  # the actor now holds step 4
        ("state_file_name",),  # the backend's file that stands for its state directory
        ("get_dir", "file:///blobs/state/s4-a", "s" * 64, "state.sha256"),
        ("load_state", "/local/s4-a"),
        ("set_rng_state", "rng4"),
    ]
    assert "trainer resumed at step 4" in caplog.text
    assert "optimizer moments from step" not in caplog.text


async def test_resume_between_full_states_warns_of_older_moments(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = Calls()
    await resume(Actor(calls), Blobs(calls), manifest(5, state_step=4))
    assert ("load_state", "/local/s4-a") in calls.made
    assert "resuming at step 5 with optimizer moments from step 4" in caplog.text

    calls = Calls()
    position = await resume(Actor(calls), Blobs(calls), manifest(1, state_step=None))
    assert position == ResumeState(1, None)
    assert [call[0] for call in calls.made] == ["get_dir", "load_weights", "set_rng_state"]


def test_a_dead_or_restarted_actor_counts_as_lost_weights() -> None:
    assert issubclass(StaleWeights, LOST_WEIGHTS) and issubclass(RayActorError, LOST_WEIGHTS)


async def test_an_actor_that_lost_its_weights_gets_the_batch_back_then_the_latest_step(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = Calls()
    latest = manifest(2, state_step=2)

    async def latest_manifest() -> Manifest:
        calls.made.append(("latest",))
        return latest

    ctx: Any = SimpleNamespace(manifests=SimpleNamespace(latest=latest_manifest))
    lost = StaleWeights("holds step 0's weights")
    position = await recover(ctx, Actor(calls), Blobs(calls), Msg(calls), lost)

    assert position == ResumeState.of(latest)
    names = [call[0] for call in calls.made]
    # nak first (the batch is redelivered and trained again from the resumed step), then wait
    # until the restarted actor answers, then load the latest committed step into it
    assert names[:4] == ["nak", "state_file_name", "latest", "get_dir"]
    assert ("load_weights", "/local/v2-a", 2) in calls.made
    assert "trainer actor lost its weights (holds step 0's weights)" in caplog.text


def test_torch_owns_the_actor_resources_and_megatron_and_fsdp_lend_them_to_their_ranks() -> None:
    torch = TrainerConfig(num_cpus=2, num_gpus=1, max_restarts=5)
    assert trainer_resources(torch) == {"num_cpus": 2, "num_gpus": 1, "max_restarts": 5}
    megatron = TrainerConfig(backend="megatron", num_cpus=2, max_restarts=5)
    assert trainer_resources(megatron) == {"num_cpus": 0, "max_restarts": 0}
    fsdp = TrainerConfig(backend="fsdp", num_cpus=2, max_restarts=5)
    assert trainer_resources(fsdp) == {"num_cpus": 0, "max_restarts": 0}

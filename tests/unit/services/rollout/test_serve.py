"""The rollout's loop over the in-memory bus and run record, on simulated engines whose time is
a gate the test opens: a task that arrives while a round runs starts its own round at once; new
weights wait for every round in flight to end; a round that fails fails the service."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import save_file
from torch import zeros

from miles import events
from miles.config import load_config
from miles.engine.simulated import SimulatedEngine
from miles.models import load_tokenizer
from miles.recipe import Recipe
from miles.runtime.bus import MemoryBroker, MemoryBus, Subscription
from miles.runtime.memory_store import MemoryManifests, MemoryRun, MemoryRunStore
from miles.runtime.service import ServiceContext
from miles.runtime.subjects import REWARD_CONSUMER
from miles.telemetry import Metrics
from miles.weights.blobs import DirBlobStore
from services.rollout.fleet import EngineFleet
from services.rollout.main import serve

RUN = "run"


@dataclass
class Rollout:
    ctx: ServiceContext
    fleet: EngineFleet
    generated: Subscription
    gate: asyncio.Event
    """Closed: every simulated generation waits for the test to open it."""

    def in_flight(self) -> int:
        return sum(handle.calls for handle in self.fleet.handles)

    async def task(self, index: int, version: int = 0) -> None:
        task = events.Task(
            run_id=RUN,
            policy_version=version,
            task_id=f"t{index}",
            prompt="1+1=",
            label="2",
            group_size=2,
            seed=index,
        )
        await self.ctx.bus.publish(self.ctx.subjects.tasks, task, msg_id=task.task_id)

    async def groups(self, count: int) -> list[events.GeneratedGroup]:
        got: list[events.GeneratedGroup] = []
        for _ in range(200):
            batch = await self.ctx.bus.fetch(
                self.generated, events.GeneratedGroup, count - len(got), 0.05
            )
            for group, msg in batch:
                got.append(group)
                await msg.ack()
            if len(got) == count:
                return got
        raise AssertionError(f"{len(got)} of {count} groups published")


async def stop(rollout: Rollout, serving: asyncio.Task[None]) -> None:
    """As the service stops: the loop ends at its next turn (not ``cancel``: the memory
    broker's ``wait_for`` can swallow a cancellation that races an ack, on Python 3.11)."""
    rollout.ctx.stopping.set()
    await asyncio.wait_for(serving, timeout=10)


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never happened")


@pytest.fixture
async def rollout(tiny_model: Path, tmp_path: Path) -> AsyncIterator[Rollout]:
    config = load_config(
        overrides=[
            f"model.path='{tiny_model}'",
            "rollout.engine='simulated'",
            "rollout.engines=2",
            "rollout.group_size=2",
            "rollout.max_new_tokens=8",
            "rollout.simulated.length_sigma=0",
            "rollout.simulated.length_mean=4",
        ]
    )
    broker = MemoryBroker()
    bus = MemoryBus(broker, RUN, "rollout")
    await bus.ensure_topology()
    run = MemoryRun(RUN)
    store = MemoryRunStore(run)
    await store.create_run("hash", "{}")
    recipe = Recipe(path=tmp_path / "recipe.py", config=config, rewards={})
    metrics = Metrics("rollout", RUN)
    ctx = ServiceContext(
        "rollout", config, recipe, RUN, tmp_path, bus, store, MemoryManifests(run), metrics
    )
    fleet = EngineFleet(config, tiny_model, load_tokenizer(config.model), "r", tmp_path)
    await fleet.start()
    gate = asyncio.Event()

    async def gated(seconds: float) -> None:
        await gate.wait()

    for handle in fleet.handles:
        assert isinstance(handle.client, SimulatedEngine)
        handle.client.sleep = gated
    generated = await MemoryBus(broker, RUN, "reward").pull("generated", REWARD_CONSUMER)
    yield Rollout(ctx, fleet, generated, gate)
    await fleet.shutdown()


async def publish_weights(rollout: Rollout, version: int, tmp_path: Path) -> None:
    local = tmp_path / f"w{version}"
    local.mkdir()
    save_file({"simulated.weight": zeros(4)}, str(local / "model.safetensors"))
    (local / "config.json").write_text(json.dumps({"model_type": "miles-simulated"}))
    sha256 = hashlib.sha256((local / "model.safetensors").read_bytes()).hexdigest()
    blobs = DirBlobStore(tmp_path / "blobs")  # the rollout's store: run_dir / "blobs"
    uri = await blobs.put_dir(local, f"weights/v{version}")
    published = events.WeightsPublished(
        run_id=RUN, policy_version=version, uri=uri, sha256=sha256, step=version
    )
    await rollout.ctx.bus.publish(rollout.ctx.subjects.weights, published, msg_id=f"w{version}")


async def test_a_task_arriving_mid_round_starts_its_own_round_at_once(rollout: Rollout) -> None:
    serving = asyncio.create_task(serve(rollout.ctx, rollout.fleet))
    await rollout.task(0)
    await until(lambda: rollout.in_flight() == 1)
    await rollout.task(1)  # the first round is still generating
    await until(lambda: rollout.in_flight() == 2)  # not queued behind it
    assert sorted(h.calls for h in rollout.fleet.handles) == [1, 1]  # on the idle engine

    rollout.gate.set()
    groups = await rollout.groups(2)
    assert sorted(g.task_id for g in groups) == ["t0", "t1"]
    assert all(len(g.samples) == 2 and g.policy_version == 0 for g in groups)
    await stop(rollout, serving)


async def test_new_weights_wait_for_the_rounds_in_flight(rollout: Rollout, tmp_path: Path) -> None:
    serving = asyncio.create_task(serve(rollout.ctx, rollout.fleet))
    await rollout.task(0)
    await until(lambda: rollout.in_flight() == 1)
    await publish_weights(rollout, 1, tmp_path)
    await rollout.task(1, version=1)  # needs the new weights
    await asyncio.sleep(0.3)
    engines = [h.client for h in rollout.fleet.handles]
    assert all(isinstance(e, SimulatedEngine) and e.loads == 0 for e in engines)  # round 0 runs
    assert rollout.in_flight() == 1

    rollout.gate.set()
    groups = {g.task_id: g for g in await rollout.groups(2)}
    assert groups["t0"].samples[0].policy_version_first == 0  # finished on the old weights
    assert groups["t1"].samples[0].policy_version_first == 1
    assert rollout.fleet.versions() == [1, 1]
    await stop(rollout, serving)


async def test_a_round_that_fails_fails_the_service(rollout: Rollout) -> None:
    async def broken(requests: list[object]) -> list[object]:
        raise ValueError("bad request")

    for handle in rollout.fleet.handles:
        handle.client.generate = broken  # type: ignore[method-assign,assignment]
    serving = asyncio.create_task(serve(rollout.ctx, rollout.fleet))
    await rollout.task(0)
    with pytest.raises(ValueError, match="bad request"):
        await asyncio.wait_for(serving, timeout=10)

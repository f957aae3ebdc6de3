"""A fleet of simulated engines: made in-process (no Ray, no servers), kept on one version,
recovered once however many overlapping calls see an engine die."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from miles.config import MilesConfig, load_config
from miles.engine.generation import EngineHandle, EngineReset
from miles.engine.simulated import SimulatedEngine
from services.rollout.fleet import EngineFleet


class Vocabulary:
    """All a simulated fleet asks of the tokenizer: its size."""

    def __len__(self) -> int:
        return 14


def simulated(*overrides: str) -> MilesConfig:
    return load_config(overrides=["rollout.engine='simulated'", "rollout.engines=3", *overrides])


async def test_simulated_engines_live_in_process_and_load_weights_together(
    tmp_path: Path,
) -> None:
    fleet = EngineFleet(simulated(), tmp_path, Vocabulary(), "r", tmp_path)  # type: ignore[arg-type]
    await fleet.start()
    assert fleet.placement is None
    assert [slot.handle.name for slot in fleet.engines] == [
        "r-engine-0",
        "r-engine-1",
        "r-engine-2",
    ]
    assert all(isinstance(h.client, SimulatedEngine) for h in fleet.handles)

    await fleet.load(tmp_path, 2)
    assert fleet.versions() == [2, 2, 2]
    assert [await h.client.weight_version() for h in fleet.handles] == [2, 2, 2]

    slot = fleet.engines[1]
    before = slot.handle.client
    await fleet.recover(slot)  # a restart is a fresh engine, synced to the fleet's weights
    assert slot.handle.client is not before
    assert await slot.handle.client.weight_version() == 2 and fleet.versions() == [2, 2, 2]
    await fleet.shutdown()


def test_simulated_engines_take_weights_from_the_blob_store_only() -> None:
    with pytest.raises(ValueError, match="no server to push weights into"):
        simulated("rollout.weight_sync='distributed'")
    with pytest.raises(ValueError, match="placeholder weights"):
        load_config(overrides=["trainer.backend='simulated'"])
    config = simulated("trainer.backend='simulated'", "trainer.simulated.seconds_per_step=0.5")
    assert config.trainer.simulated.seconds_per_step == 0.5


async def test_calls_that_see_one_death_together_recover_the_engine_once(tmp_path: Path) -> None:
    fleet = EngineFleet(simulated(), tmp_path, Vocabulary(), "r", tmp_path)  # type: ignore[arg-type]
    await fleet.start()
    handle = fleet.handles[0]
    dead = handle.client
    both_in = asyncio.Barrier(2)

    async def work(engine: EngineHandle) -> object:
        client = engine.client
        if client is dead:  # both calls start on the engine that dies under them
            await both_in.wait()
            raise EngineReset("server restarted")
        return client

    served = await asyncio.gather(fleet.run(handle, work), fleet.run(handle, work))
    assert fleet.engines[0].recoveries == 1  # the second call retried on the recovered engine
    assert served[0] is served[1] is handle.client and handle.client is not dead
    await fleet.shutdown()

"""A dead engine is recovered without restarting the rollout service: restarted by Ray (or
replaced when its restarts are used up), re-synced to the fleet's weights, and the interrupted
generation retried with the same seeds, so it returns the same tokens."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import ray
from transformers import AutoTokenizer

from miles import events, raycluster
from miles.config import load_config
from miles.generation import EngineHandle, rollout_many
from services.rollout.fleet import EngineFleet

pytestmark = pytest.mark.integration


def _task(index: int) -> events.Task:
    return events.Task(
        run_id="fleet",
        policy_version=0,
        task_id=f"t{index}",
        prompt="12+34=",
        label="46",
        group_size=4,
        seed=index,
    )


async def _gone(engine: EngineHandle) -> None:
    """ray.kill is asynchronous: wait until the old worker stopped answering."""
    for _ in range(100):
        try:
            await engine.actor.health.remote()
        except ray.exceptions.RayActorError:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the engine never died")


@pytest.mark.parametrize("restarts", [1, 0], ids=["restarted-by-ray", "replaced"])
async def test_dead_engine_is_recovered_and_resynced(
    ray_cluster: str, tiny_model: Path, tmp_path: Path, restarts: int
) -> None:
    raycluster.connect(ray_cluster, namespace="fleet-test")
    config = load_config(
        overrides=[
            f'model.path="{tiny_model}"',
            "rollout.max_new_tokens=4",
            "rollout.engine_threads=1",
            "rollout.engine_num_cpus=0.5",
            f"rollout.engine_max_restarts={restarts}",
        ]
    )
    fleet = EngineFleet(config, tiny_model, AutoTokenizer.from_pretrained(tiny_model), tag="t")
    try:
        await fleet.wait_ready()
        weights = tmp_path / "v3"
        shutil.copytree(tiny_model, weights)
        await fleet.load(weights, 3)
        [engine] = fleet.engines

        async def generate(e: EngineHandle) -> list[list[events.Sample]]:
            return await rollout_many(e, [_task(0), _task(1)], config.rollout)

        before = await fleet.run(engine, generate)
        ray.kill(engine.actor, no_restart=False)  # the worker process dies, as on a lost node
        await _gone(engine)
        after = await fleet.run(engine, generate)

        assert fleet.replaced == (0 if restarts else 1)
        assert engine.weight_version == 3
        assert await engine.actor.weight_version.remote() == 3  # re-synced, not the base model
        assert [s.response_ids for g in after for s in g] == [
            s.response_ids for g in before for s in g
        ]
        assert {s.policy_version_first for g in after for s in g} == {3}
    finally:
        fleet.shutdown()

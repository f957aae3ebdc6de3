"""The rollout's engines, each its own server process driven over SGLang's HTTP API.

A dead engine is recovered without restarting the rollout service (its server started again,
or its actor replaced), re-synced to the fleet's weights, and the interrupted generation
retried with the same seeds, so it returns the same tokens. A slow engine is found, flagged,
drained and restarted."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import ray
from transformers import AutoTokenizer

from miles import events
from miles.config import MilesConfig, load_config
from miles.engine.generation import EngineHandle, rollout_many
from miles.runtime import raycluster
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


def _config(tiny_model: Path, *overrides: str) -> MilesConfig:
    return load_config(
        overrides=[
            f'model.path="{tiny_model}"',
            "rollout.max_new_tokens=4",
            "rollout.engine_threads=1",
            "rollout.engine_num_cpus=0.5",
            *overrides,
        ]
    )


async def _fleet(config: MilesConfig, tiny_model: Path, tmp_path: Path, **kw) -> EngineFleet:  # type: ignore[no-untyped-def]
    fleet = EngineFleet(
        config, tiny_model, AutoTokenizer.from_pretrained(tiny_model), "t", tmp_path, **kw
    )
    await fleet.start()
    weights = tmp_path / "v3"
    shutil.copytree(tiny_model, weights)
    await fleet.load(weights, 3)
    return fleet


async def test_dead_engine_is_recovered_and_resynced(
    ray_cluster: str, tiny_model: Path, tmp_path: Path
) -> None:
    raycluster.connect(ray_cluster, namespace="fleet-test")
    config = _config(tiny_model)
    fleet = await _fleet(config, tiny_model, tmp_path)
    try:
        [engine] = fleet.engines

        async def generate(e: EngineHandle) -> list[list[events.Sample]]:
            return await rollout_many(e, [_task(0), _task(1)], config.rollout)

        before = await fleet.run(engine.handle, generate)
        tokens = [s.response_ids for g in before for s in g]

        # The server process dies (OOM killer, a crash in the engine): started again.
        os.kill(await engine.actor.server_pid.remote(), signal.SIGKILL)
        after = await fleet.run(engine.handle, generate)
        assert [s.response_ids for g in after for s in g] == tokens
        assert {s.policy_version_first for g in after for s in g} == {3}  # re-synced
        assert fleet.replaced == 0

        # The actor's worker is gone for good: a replacement actor and server.
        ray.kill(engine.actor, no_restart=True)
        after = await fleet.run(engine.handle, generate)
        assert [s.response_ids for g in after for s in g] == tokens
        assert {s.policy_version_first for g in after for s in g} == {3}
        assert fleet.replaced == 1
    finally:
        await fleet.shutdown()


async def test_a_slow_engine_is_flagged_drained_and_restarted(
    ray_cluster: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raycluster.connect(ray_cluster, namespace="fleet-test")
    monkeypatch.setenv("MILES_SLOW_ENGINE", "1:0.4")  # engine 1 sleeps 0.4 s per generate
    config = _config(
        tiny_model,
        "rollout.engines=2",
        "rollout.straggler_patience=2",
        "rollout.straggler_restarts=1",
    )
    flagged: list[tuple[str, str]] = []

    async def on_straggler(engine: EngineHandle, rate: float, median: float, action: str) -> None:
        assert rate < 0.5 * median
        flagged.append((engine.name, action))

    fleet = await _fleet(config, tiny_model, tmp_path, on_straggler=on_straggler)
    try:
        for round_ in range(8):
            for engine in fleet.active:
                await fleet.run(
                    engine, lambda e, r=round_: rollout_many(e, [_task(r)], config.rollout)
                )
            await fleet.check_stragglers()
        # Flagged after 2 slow rounds and restarted (still slow: the delay is its config), then
        # flagged again and, its one restart used, left drained: the fleet works on without it.
        assert flagged == [
            ("t-engine-1", "drained and restarted"),
            ("t-engine-1", "stays drained"),
        ]
        assert [e.name for e in fleet.active] == ["t-engine-0"]
        assert fleet.stragglers.paces[1].restarts == 1
        assert fleet.engines[1].handle.weight_version == 3  # re-synced after its restart
    finally:
        await fleet.shutdown()

"""A whole run on simulated compute: the five services (two rollout replicas) on real NATS,
Redis and Ray, with ``rollout.engine = "simulated"`` and ``trainer.backend = "simulated"``,
what ``benchmarks/bench_pipeline.py`` measures. It finishes its steps, and the manifests say
every sample was trained once, within the staleness bound."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from miles.config import load_config
from miles.recipe import load_recipe
from miles.runtime import embedded
from miles.runtime.checkpoint import Manifests
from miles.runtime.service import run_service
from miles.runtime.store import RunStore, connect_redis
from services.buffer.main import main as buffer_main
from services.coordinator.main import main as coordinator_main
from services.reward.main import main as reward_main
from services.rollout.main import main as rollout_main
from services.trainer.main import main as trainer_main

pytestmark = pytest.mark.integration

RECIPE = """
import zlib

import miles


@miles.reward
def spread(sample: miles.Sample) -> float:
    return (zlib.crc32(sample.sample_id.encode()) % 100) / 100
"""


async def test_a_run_on_simulated_engines_and_trainer_finishes(
    nats_server: embedded.Server,
    redis_server: embedded.Server,
    ray_cluster: str,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    prompts = tmp_path / "train.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"{i}+1=", "label": ""}) + "\n" for i in range(50))
    )
    (tmp_path / "recipe.py").write_text(RECIPE)
    config = load_config(
        overrides=[
            f'infra.nats_url="{nats_server.url}"',
            f'infra.redis_url="{redis_server.url}"',
            f'infra.ray_address="{ray_cluster}"',
            "infra.metrics_port='off'",
            f'model.path="{tiny_model}"',
            f'data.train_path="{prompts}"',
            "run.steps=3",
            "rollout.engine='simulated'",
            "rollout.engines=3",
            "rollout.group_size=4",
            "rollout.max_new_tokens=8",
            "rollout.simulated.tokens_per_second=400",
            "rollout.simulated.length_mean=4",
            "rollout.simulated.load_seconds=0.01",
            "trainer.backend='simulated'",
            "trainer.simulated.seconds_per_step=0.05",
            "buffer.groups_per_batch=2",
            "buffer.max_staleness=1",
            "coordinator.heartbeat_seconds=0.2",
        ]
    )
    recipe = load_recipe(tmp_path / "recipe.py")
    run_id = f"sim{uuid.uuid4().hex[:8]}"
    mains = [
        ("coordinator", coordinator_main),
        ("rollout", rollout_main),
        ("rollout", rollout_main),
        ("reward", reward_main),
        ("buffer", buffer_main),
        ("trainer", trainer_main),
    ]
    services = [
        asyncio.create_task(run_service(name, main, config, recipe, run_id, tmp_path))
        for name, main in mains
    ]
    done, pending = await asyncio.wait(services, timeout=120)  # each stops once it is finished
    assert not pending, "the run did not finish within 120 s"
    for service in done:
        service.result()

    assert config.infra.redis_url is not None
    redis = await connect_redis(config.infra.redis_url, 5)
    try:
        assert (await RunStore(redis, run_id).record()).status == "finished"
        manifests = await Manifests(redis, run_id).all()
    finally:
        await redis.aclose()
    assert [m.step for m in manifests] == [1, 2, 3]
    trained = [sample for m in manifests for sample in m.sample_ids]
    assert len(trained) == len(set(trained)) == 3 * 2 * 4  # each sample trained once
    for manifest in manifests:
        assert manifest.step - 1 - manifest.min_sample_version <= 1  # max_staleness
        assert manifest.metrics["tokens"] > 0 and manifest.weights_sha256

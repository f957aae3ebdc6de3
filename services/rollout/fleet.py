"""The engines a rollout replica owns: Ray actors behind one handle each, kept on one version."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import ray

from miles.config import MilesConfig
from miles.engine.transformers_engine import TransformersEngine
from miles.generation import EngineHandle

log = logging.getLogger(__name__)


class EngineFleet:
    def __init__(self, config: MilesConfig, model_path: Path, tokenizer: object, tag: str) -> None:
        actor_class = ray.remote(TransformersEngine)
        rollout = config.rollout
        self.engines = [
            EngineHandle(
                actor_class.options(num_cpus=rollout.engine_num_cpus, max_restarts=0).remote(
                    str(model_path), rollout.engine_threads, 0
                ),
                tokenizer,
                name=f"{tag}-engine-{i}",
                weight_version=0,
            )
            for i in range(rollout.engines)
        ]

    @property
    def weight_version(self) -> int:
        return min(engine.weight_version for engine in self.engines)

    async def wait_ready(self) -> None:
        await asyncio.gather(*(e.actor.health.remote() for e in self.engines))

    async def load(self, model_path: Path, version: int) -> None:
        """Pause, load, continue: every engine moves to ``version`` before generating again."""

        async def one(engine: EngineHandle) -> None:
            await engine.actor.pause_generation.remote()
            await engine.actor.update_weights_from_disk.remote(str(model_path), version)
            await engine.actor.continue_generation.remote()
            engine.weight_version = version

        await asyncio.gather(*(one(e) for e in self.engines if e.weight_version < version))
        log.info("engines now at policy version %d", version)

    def shutdown(self) -> None:
        for engine in self.engines:
            ray.kill(engine.actor)

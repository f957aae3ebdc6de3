"""The engines a rollout replica owns: Ray actors behind one handle each, kept on one version.

An engine that dies (its worker process killed, its node lost) is recovered without restarting
the rollout service: Ray restarts the actor while ``rollout.engine_max_restarts`` allows,
otherwise the fleet starts a replacement; either way the engine is re-synced to the weights
the fleet last loaded before it generates again, and the interrupted generation is retried
(requests carry their own seeds, so the retry samples the same tokens).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import ray
import ray.exceptions

from miles.config import MilesConfig
from miles.engine.transformers_engine import TransformersEngine
from miles.generation import EngineHandle, EngineReset

log = logging.getLogger("miles.rollout")
T = TypeVar("T")
RECOVERY_SECONDS = 120.0


class EngineFleet:
    def __init__(self, config: MilesConfig, model_path: Path, tokenizer: object, tag: str) -> None:
        self.config = config
        self.model_path = model_path
        self.current: tuple[Path, int] | None = None  # the weights every engine should hold
        self.replaced = 0
        self.engines = [
            EngineHandle(self._new_actor(), tokenizer, name=f"{tag}-engine-{i}", weight_version=0)
            for i in range(config.rollout.engines)
        ]

    def _new_actor(self) -> Any:
        rollout = self.config.rollout
        return (
            ray.remote(TransformersEngine)
            .options(
                num_cpus=rollout.engine_num_cpus,
                max_restarts=rollout.engine_max_restarts,
                max_task_retries=0,  # a retried generate must go through recover() first
            )
            .remote(str(self.model_path), rollout.engine_threads, 0)
        )

    @property
    def weight_version(self) -> int:
        return min(engine.weight_version for engine in self.engines)

    async def wait_ready(self) -> None:
        await asyncio.gather(*(e.actor.health.remote() for e in self.engines))

    async def load(self, model_path: Path, version: int) -> None:
        """Pause, load, continue: every engine moves to ``version`` before generating again."""
        self.current = (model_path, version)
        await asyncio.gather(*(self._sync(e) for e in self.engines if e.weight_version < version))
        log.info("engines now at policy version %d", version)

    async def _sync(self, engine: EngineHandle) -> None:
        if self.current is None:
            return
        path, version = self.current
        await engine.actor.pause_generation.remote()
        await engine.actor.update_weights_from_disk.remote(str(path), version)
        await engine.actor.continue_generation.remote()
        engine.weight_version = version

    async def run(
        self, engine: EngineHandle, work: Callable[[EngineHandle], Awaitable[T]], attempts: int = 3
    ) -> T:
        """``work(engine)``, recovering the engine and retrying if it dies under it."""
        for attempt in range(1, attempts + 1):
            try:
                return await work(engine)
            except (ray.exceptions.RayActorError, EngineReset) as exc:
                if attempt == attempts:
                    raise
                log.warning("%s died (%s); recovering it", engine.name, type(exc).__name__)
                await self.recover(engine)
        raise AssertionError("unreachable")

    async def recover(self, engine: EngineHandle) -> None:
        """Wait for Ray's restart of the actor, or replace it; then re-sync its weights."""
        engine.weight_version = 0  # a restarted actor holds the base model again
        if await self._restarted(engine):
            log.info("%s restarted by Ray", engine.name)
        else:
            ray.kill(engine.actor, no_restart=True)
            engine.actor = self._new_actor()
            await asyncio.wait_for(engine.actor.health.remote(), timeout=RECOVERY_SECONDS)
            self.replaced += 1
            log.info("%s replaced by a new actor", engine.name)
        await self._sync(engine)
        log.info("%s back at policy version %d", engine.name, engine.weight_version)

    async def _restarted(self, engine: EngineHandle) -> bool:
        """True once the actor answers again; False when Ray will not bring it back."""
        deadline = time.monotonic() + RECOVERY_SECONDS
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(engine.actor.health.remote(), timeout=RECOVERY_SECONDS)
                return True
            except ray.exceptions.ActorUnavailableError:  # restarting: ask again shortly
                await asyncio.sleep(0.2)
            except (ray.exceptions.RayActorError, TimeoutError):  # dead for good
                return False
        return False

    def shutdown(self) -> None:
        for engine in self.engines:
            ray.kill(engine.actor)

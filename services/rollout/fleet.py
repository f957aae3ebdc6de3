"""The engines a rollout replica owns, kept on one policy version, healthy and fast.

Each engine is its own server process, started by a Ray actor that holds its resources
(``SGLangServerProcess``: `sglang.launch_server` on GPUs, miles' CPU server here) and driven
over SGLang's HTTP API (``SGLangEngine``). The fleet:

- loads new weights into every engine: pause, ``/update_weights_from_disk``, continue;
- recovers an engine that dies (its server process, or its actor's worker) without restarting
  the rollout service: the server is started again (or the actor replaced when Ray will not
  restart it), re-synced to the weights the fleet last loaded, and the interrupted generation
  retried (requests carry their own seeds, so the retry samples the same tokens);
- finds stragglers: an engine whose tokens/s stays under ``rollout.straggler_fraction`` of the
  fleet's median for ``rollout.straggler_patience`` rounds is flagged, drained (it gets no work)
  and restarted; after ``rollout.straggler_restarts`` restarts it stays drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import ray
import ray.exceptions
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from miles.config import MilesConfig, RolloutConfig
from miles.engine.generation import EngineHandle, EngineReset
from miles.engine.sglang_client import SGLangConnectionError, SGLangEngine, SGLangError
from miles.engine.sglang_launcher import ServerStartError, SGLangServerProcess
from miles.runtime import faults

log = logging.getLogger("miles.rollout")
T = TypeVar("T")
ENGINE_DIED = (ray.exceptions.RayActorError, SGLangConnectionError, EngineReset)


@dataclass
class Engine:
    """One engine: the actor that owns its server process, and the handle rollouts use."""

    index: int
    actor: Any
    handle: EngineHandle
    drained: bool = False
    slow_rounds: int = 0
    restarts: int = 0
    rate: float | None = None  # tokens/s over the last round it worked
    counted: tuple[int, float] = (0, 0.0)  # handle's tokens and seconds at the last check
    flags: list[str] = field(default_factory=list)


OnStraggler = Callable[[EngineHandle, float, float, str], Awaitable[None]]


class EngineFleet:
    def __init__(
        self,
        config: MilesConfig,
        model_path: Path,
        tokenizer: object,
        tag: str,
        log_dir: Path,
        on_straggler: OnStraggler | None = None,
    ) -> None:
        self.config = config
        self.model_path = model_path
        self.tokenizer = tokenizer
        self.tag = tag
        self.log_dir = log_dir
        self.on_straggler = on_straggler
        self.current: tuple[Path, int] | None = None  # the weights every engine should hold
        self.replaced = 0
        self.engines: list[Engine] = []
        self.placement: PlacementGroup | None = None

    async def start(self) -> None:
        """Reserve one placement-group bundle per engine, then start every server in parallel.

        The bundles hold each engine's CPUs and GPUs for the fleet's lifetime, so an engine
        restarted or replaced after a failure lands in the same reserved slot instead of
        competing with the trainer for resources.
        """
        rollout = self.rollout
        bundle = {"CPU": rollout.engine_num_cpus}
        if rollout.engine_num_gpus:
            bundle["GPU"] = rollout.engine_num_gpus
        self.placement = placement_group(
            [dict(bundle) for _ in range(rollout.engines)],
            strategy=rollout.placement_strategy,
            name=f"{self.tag}-engines",
        )
        await self.placement.ready()
        self.engines = list(await asyncio.gather(*map(self._start, range(rollout.engines))))

    @property
    def rollout(self) -> RolloutConfig:
        return self.config.rollout

    @property
    def handles(self) -> list[EngineHandle]:
        return [engine.handle for engine in self.engines]

    @property
    def active(self) -> list[EngineHandle]:
        """Engines that get work: all but drained stragglers."""
        return [engine.handle for engine in self.engines if not engine.drained]

    @property
    def weight_version(self) -> int:
        return min(engine.handle.weight_version for engine in self.engines)

    def _new_actor(self, index: int) -> Any:
        rollout = self.rollout
        assert self.placement is not None, "start() reserves the engines' placement group"
        delay = faults.engine_delay(index)
        return (
            ray.remote(SGLangServerProcess)
            .options(
                num_cpus=rollout.engine_num_cpus,
                num_gpus=rollout.engine_num_gpus,
                max_restarts=rollout.engine_max_restarts,
                max_task_retries=0,  # a retried call must go through recover() first
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.placement, placement_group_bundle_index=index
                ),
            )
            .remote(
                rollout.engine,
                str(self.model_path),
                host=rollout.engine_host,
                server_args=self._server_args(),
                log_path=self.log_dir / f"{self.tag}-engine-{index}.log",
                env={"MILES_ENGINE_DELAY": str(delay)} if delay else None,
            )
        )

    def _server_args(self) -> list[str]:
        if self.rollout.engine == "local":
            return ["--threads", str(self.rollout.engine_threads)]
        return list(self.rollout.sglang_args)

    async def _start(self, index: int) -> Engine:
        actor = self._new_actor(index)
        url = await actor.start.remote()
        name = f"{self.tag}-engine-{index}"
        return Engine(index, actor, EngineHandle(SGLangEngine(url), self.tokenizer, name, 0))

    async def load(self, model_path: Path, version: int) -> None:
        """Pause, load, continue: every engine moves to ``version`` before generating again."""
        self.current = (model_path, version)
        stale = [e for e in self.engines if e.handle.weight_version < version]
        await asyncio.gather(*(self.run(e.handle, self._sync) for e in stale))
        log.info("engines now at policy version %d", version)

    async def _sync(self, handle: EngineHandle) -> None:
        if self.current is None:
            return
        path, version = self.current
        await handle.client.pause_generation()
        await handle.client.update_weights_from_disk(str(path), version)
        await handle.client.continue_generation()
        handle.weight_version = version

    async def run(
        self, handle: EngineHandle, work: Callable[[EngineHandle], Awaitable[T]], attempts: int = 3
    ) -> T:
        """``work(handle)``, recovering the engine and retrying if it dies under it."""
        for attempt in range(1, attempts + 1):
            try:
                return await work(handle)
            except ENGINE_DIED as exc:
                if attempt == attempts:
                    raise
                log.warning("%s died (%s: %s); recovering it", handle.name, type(exc).__name__, exc)
                await self.recover(self._engine(handle))
        raise AssertionError("unreachable")

    def _engine(self, handle: EngineHandle) -> Engine:
        return next(e for e in self.engines if e.handle is handle)

    async def recover(self, engine: Engine) -> None:
        """Start the engine's server again, or replace its actor; then re-sync its weights."""
        handle = engine.handle
        handle.weight_version = 0  # a fresh server holds the base model
        await handle.client.aclose()
        try:
            url = await engine.actor.restart.remote()
            log.info("%s: server restarted", handle.name)
        except (ray.exceptions.RayActorError, ServerStartError) as exc:
            log.warning("%s: actor lost (%s); starting a replacement", handle.name, exc)
            ray.kill(engine.actor, no_restart=True)
            engine.actor = self._new_actor(engine.index)
            url = await engine.actor.start.remote()
            self.replaced += 1
        handle.client = SGLangEngine(url)
        await self._sync(handle)
        log.info("%s back at policy version %d", handle.name, handle.weight_version)

    async def check_stragglers(self) -> None:
        """After a round of work: flag, drain and restart engines far under the median."""
        for engine in self.engines:
            tokens, seconds = engine.handle.tokens, engine.handle.seconds
            done = (tokens - engine.counted[0], seconds - engine.counted[1])
            engine.counted = (tokens, seconds)
            if done[0] > 0 and done[1] > 0:
                engine.rate = done[0] / done[1]
        rates = [e.rate for e in self.engines if not e.drained and e.rate is not None]
        if len(rates) < 2:
            return
        median = statistics.median(rates)
        for engine in self.engines:
            if engine.drained or engine.rate is None:
                continue
            slow = engine.rate < self.rollout.straggler_fraction * median
            engine.slow_rounds = engine.slow_rounds + 1 if slow else 0
            if engine.slow_rounds >= self.rollout.straggler_patience:
                await self._straggler(engine, median)

    def urls(self) -> dict[str, str]:
        """Engine name -> base URL of its server (drained stragglers excluded)."""
        return {e.handle.name: e.handle.client.base_url for e in self.engines if not e.drained}

    async def refresh_versions(self) -> None:
        """Ask each engine which weights it holds (the trainer may have broadcast new ones)."""

        async def ask(handle: EngineHandle) -> None:
            with contextlib.suppress(*ENGINE_DIED, SGLangError):
                handle.weight_version = max(
                    handle.weight_version, await handle.client.weight_version()
                )

        await asyncio.gather(*(ask(e.handle) for e in self.engines))

    def engine_health(self) -> list[tuple[str, float | None, bool]]:
        """(name, tokens/s of its last round, drained) per engine, for the metrics."""
        return [(e.handle.name, e.rate, e.drained) for e in self.engines]

    async def _straggler(self, engine: Engine, median: float) -> None:
        handle, rate = engine.handle, engine.rate or 0.0
        engine.drained, engine.slow_rounds, engine.rate = True, 0, None
        if engine.restarts >= self.rollout.straggler_restarts:
            action = "stays drained"
        else:
            action = "drained and restarted"
        log.warning(
            "%s is a straggler: %.0f tokens/s against a fleet median of %.0f; %s",
            handle.name,
            rate,
            median,
            action,
        )
        engine.flags.append(action)
        if self.on_straggler is not None:
            await self.on_straggler(handle, rate, median, action)
        if action == "stays drained":
            return
        engine.restarts += 1
        await self.recover(engine)
        engine.drained = False

    async def shutdown(self) -> None:
        for engine in self.engines:
            await engine.handle.client.aclose()
            with contextlib.suppress(ray.exceptions.RayActorError, TimeoutError):
                await asyncio.wait_for(engine.actor.stop.remote(), timeout=20)
            ray.kill(engine.actor)
        if self.placement is not None:
            remove_placement_group(self.placement)

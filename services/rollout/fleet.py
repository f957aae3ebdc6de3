"""The engines a rollout replica owns, kept on one policy version, healthy and fast.

Each engine is its own server process, started by a Ray actor that holds its resources
(``SGLangServerProcess``: `sglang.launch_server` on GPUs, miles' CPU server here) and driven
over SGLang's HTTP API (``SGLangClient``). The fleet:

- loads new weights into every engine behind: pause, ``/update_weights_from_disk``, continue;
- recovers an engine that dies (its server process, or its actor's worker) without restarting
  the rollout service: the server is started again (or the actor replaced when Ray will not
  restart it), re-synced to the weights the fleet last loaded, and the interrupted generation
  retried (requests carry their own seeds, so the retry samples the same tokens);
- acts on the straggler verdicts (``stragglers``): flags a straggler, drains it (it gets no
  work) and restarts it, or leaves it drained once it used its restarts.

With ``rollout.engine = "simulated"`` (benchmarks, tests) the engines are ``SimulatedEngine``s in
this process: no actor, no server and no placement group; a restart is a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import ray
import ray.exceptions
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from transformers import PreTrainedTokenizerBase

from miles.config import MilesConfig, RolloutConfig
from miles.engine.generation import EngineHandle, EngineReset
from miles.engine.sglang_client import SGLangClient, SGLangConnectionError, SGLangError
from miles.engine.sglang_launcher import ServerStartError, SGLangServerProcess
from miles.engine.simulated import SimulatedEngine
from miles.runtime import faults
from services.rollout.stragglers import StragglerAction, StragglerTracker, Throughput
from services.rollout.weight_sync import engines_behind

log = logging.getLogger("miles.rollout")
T = TypeVar("T")
ENGINE_DIED = (ray.exceptions.RayActorError, SGLangConnectionError, EngineReset)


@dataclass
class EngineSlot:
    """One place in the fleet: the actor that owns the engine's server, and its handle.

    The slot outlives its server and actor: a recovered engine keeps its index (its placement
    bundle), its name and its handle, with a new client to the new server's ``url``.
    """

    index: int
    actor: Any  # a Ray actor handle of SGLangServerProcess; None for a simulated engine
    handle: EngineHandle
    url: str
    recoveries: int = 0
    """Times the engine was recovered: a failure seen before the latest needs no other."""
    recovering: asyncio.Lock = field(default_factory=asyncio.Lock)


OnStraggler = Callable[[EngineHandle, float, float, StragglerAction], Awaitable[None]]


class EngineFleet:
    def __init__(
        self,
        config: MilesConfig,
        model_path: Path,
        tokenizer: PreTrainedTokenizerBase,
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
        self.engines: list[EngineSlot] = []
        self.placement: PlacementGroup | None = None
        rollout = config.rollout
        self.stragglers = StragglerTracker(
            rollout.engines,
            rollout.straggler_fraction,
            rollout.straggler_patience,
            rollout.straggler_restarts,
        )

    async def start(self) -> None:
        """Reserve one placement-group bundle per engine, then start every server in parallel.

        The bundles hold each engine's CPUs and GPUs for the fleet's lifetime, so an engine
        restarted or replaced after a failure lands in the same reserved slot instead of
        competing with the trainer for resources.
        """
        rollout = self.rollout
        if rollout.engine == "simulated":
            self.engines = [self._simulated(index) for index in range(rollout.engines)]
            return
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
        return [slot.handle for slot in self.engines]

    @property
    def active(self) -> list[EngineHandle]:
        """Engines that get work, those with fewest calls in flight first (rounds overlap): all
        but drained stragglers."""
        ready = [s.handle for s in self.engines if not self.stragglers.drained(s.index)]
        return sorted(ready, key=lambda handle: handle.calls)

    def versions(self) -> list[int]:
        """The policy version each engine holds, by index."""
        return [slot.handle.weight_version for slot in self.engines]

    @property
    def weight_version(self) -> int:
        return min(self.versions())

    def _simulated(self, index: int) -> EngineSlot:
        name = f"{self.tag}-engine-{index}"
        client = SimulatedEngine(self.rollout.simulated, len(self.tokenizer))
        return EngineSlot(index, None, EngineHandle(client, self.tokenizer, name, 0), "")

    def _new_actor(self, index: int) -> Any:
        rollout = self.rollout
        assert rollout.engine != "simulated", "simulated engines have no actor"
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
        model = self.config.model
        shared = ["--tokenizer-path", str(model.tokenizer_path)] if model.tokenizer_path else []
        shared += ["--trust-remote-code"] if model.trust_remote_code else []
        if self.rollout.engine == "local":
            return ["--threads", str(self.config.cpu_threads().engine), *shared]
        return [*shared, *self.rollout.sglang_args]

    async def _start(self, index: int) -> EngineSlot:
        actor = self._new_actor(index)
        url = await actor.start.remote()
        handle = EngineHandle(SGLangClient(url), self.tokenizer, f"{self.tag}-engine-{index}", 0)
        return EngineSlot(index, actor, handle, url)

    async def load(self, model_path: Path, version: int) -> None:
        """Pause, load, continue: every engine moves to ``version`` before generating again."""
        self.current = (model_path, version)
        behind = [self.engines[i] for i in engines_behind(version, self.versions())]
        await asyncio.gather(*(self.run(slot.handle, self._sync) for slot in behind))
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
        """``work(handle)``, recovering the engine and retrying if it dies under it.

        Rounds overlap, so several calls can see the same death: the first to get the slot's
        lock recovers the engine, the others find it recovered since they started and retry on
        the new server (recovering it again would kill the requests just retried on it).
        """
        slot = self._slot(handle)
        for attempt in range(1, attempts + 1):
            recoveries = slot.recoveries
            try:
                return await work(handle)
            except ENGINE_DIED as exc:
                if attempt == attempts:
                    raise
                async with slot.recovering:
                    if slot.recoveries == recoveries:
                        log.warning(
                            "%s died (%s: %s); recovering it", handle.name, type(exc).__name__, exc
                        )
                        await self.recover(slot)
        raise AssertionError("unreachable")

    def _slot(self, handle: EngineHandle) -> EngineSlot:
        return next(slot for slot in self.engines if slot.handle is handle)

    async def recover(self, slot: EngineSlot) -> None:
        """Start the engine's server again, or replace its actor; then re-sync its weights."""
        handle = slot.handle
        handle.weight_version = 0  # a fresh server holds the base model
        await handle.client.aclose()
        if slot.actor is None:  # simulated
            handle.client = self._simulated(slot.index).handle.client
            await self._sync(handle)
            slot.recoveries += 1
            return
        try:
            slot.url = await slot.actor.restart.remote()
            log.info("%s: server restarted", handle.name)
        except (ray.exceptions.RayActorError, ServerStartError) as exc:
            log.warning("%s: actor lost (%s); starting a replacement", handle.name, exc)
            ray.kill(slot.actor, no_restart=True)
            slot.actor = self._new_actor(slot.index)
            slot.url = await slot.actor.start.remote()
            self.replaced += 1
        handle.client = SGLangClient(slot.url)
        await self._sync(handle)
        slot.recoveries += 1
        log.info("%s back at policy version %d", handle.name, handle.weight_version)

    async def check_stragglers(self) -> None:
        """After a round of work: flag, drain and restart engines far under the median."""
        totals = [Throughput(s.handle.tokens, s.handle.seconds) for s in self.engines]
        for straggler in self.stragglers.after_round(totals):
            slot = self.engines[straggler.index]
            log.warning(
                "%s is a straggler: %.0f tokens/s against a fleet median of %.0f; %s",
                slot.handle.name,
                straggler.rate,
                straggler.median,
                straggler.action,
            )
            if self.on_straggler is not None:
                await self.on_straggler(
                    slot.handle, straggler.rate, straggler.median, straggler.action
                )
            if straggler.restart:
                await self.recover(slot)
                self.stragglers.restarted(slot.index)

    def urls(self) -> dict[str, str]:
        """Engine name -> base URL of its server (drained stragglers excluded)."""
        return {s.handle.name: s.url for s in self.engines if not self.stragglers.drained(s.index)}

    async def refresh_versions(self) -> None:
        """Ask each engine which weights it holds (the trainer may have broadcast new ones)."""

        async def ask(handle: EngineHandle) -> None:
            with contextlib.suppress(*ENGINE_DIED, SGLangError):
                handle.weight_version = max(
                    handle.weight_version, await handle.client.weight_version()
                )

        await asyncio.gather(*(ask(slot.handle) for slot in self.engines))

    def engine_health(self) -> list[tuple[str, float | None, bool]]:
        """(name, tokens/s of its last round, drained) per engine, for the metrics."""
        paces = self.stragglers.paces
        return [(s.handle.name, paces[s.index].rate, paces[s.index].drained) for s in self.engines]

    async def shutdown(self) -> None:
        for slot in self.engines:
            await slot.handle.client.aclose()
            if slot.actor is None:  # simulated
                continue
            with contextlib.suppress(ray.exceptions.RayActorError, TimeoutError):
                await asyncio.wait_for(slot.actor.stop.remote(), timeout=20)
            ray.kill(slot.actor)
        if self.placement is not None:
            remove_placement_group(self.placement)

"""What every service process shares: connections, heartbeats, time accounting and stopping.

A service's ``main`` receives a ``ServiceContext`` and reads as its control loop; everything
about being a well-behaved process on the bus lives here instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from redis.asyncio import Redis

from miles import events
from miles.bus import Bus, connect_nats
from miles.checkpoint import Manifests
from miles.config import MilesConfig
from miles.recipe import Recipe
from miles.store import RunStore, connect_redis
from miles.subjects import Subjects

log = logging.getLogger(__name__)


@dataclass
class Clock:
    """Seconds a service spent working vs waiting for input: the basis of the bleed ratio."""

    busy_seconds: float = 0.0
    wait_seconds: float = 0.0
    processed: int = 0

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.busy_seconds += time.monotonic() - start

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.wait_seconds += time.monotonic() - start


@dataclass
class ServiceContext:
    service: str
    config: MilesConfig
    recipe: Recipe
    run_id: str
    run_dir: Path
    bus: Bus
    store: RunStore
    redis: Redis
    instance: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    clock: Clock = field(default_factory=Clock)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    @functools.cached_property
    def manifests(self) -> Manifests:
        return Manifests(self.redis, self.run_id)

    @property
    def subjects(self) -> Subjects:
        return self.bus.subjects

    def heartbeat(self) -> events.Heartbeat:
        return events.Heartbeat(
            run_id=self.run_id,
            policy_version=-1,
            service=self.service,
            instance=self.instance,
            pid=os.getpid(),
            time=time.time(),
            busy_seconds=self.clock.busy_seconds,
            wait_seconds=self.clock.wait_seconds,
            processed=self.clock.processed,
        )

    async def _heartbeat_loop(self) -> None:
        period = self.config.coordinator.heartbeat_seconds
        while not self.stopping.is_set():
            beat = self.heartbeat()
            await self.bus.nc.publish(
                self.subjects.heartbeat(self.service, self.instance), events.encode(beat)
            )
            await self.store.heartbeat(beat)  # `miles status` works even without a coordinator
            status = await self.store.status()
            if status in ("finished", "failed"):
                log.info("run %s is %s; %s stops", self.run_id, status, self.service)
                self.stopping.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=period)

    async def _control(self) -> None:
        async def on_message(msg) -> None:  # type: ignore[no-untyped-def]
            try:
                control = events.decode(msg.data, events.Control, self.run_id)
            except events.BadEvent as exc:
                await self.bus.dead_letter(msg.subject, msg.data, exc.reason, exc.detail)
                return
            if control.command == "stop":
                log.info("%s: stop requested (%s)", self.service, control.reason)
                self.stopping.set()

        await self.bus.nc.subscribe(self.subjects.control(), cb=on_message)


async def run_service(
    service: str,
    main: Callable[[ServiceContext], Awaitable[None]],
    config: MilesConfig,
    recipe: Recipe,
    run_id: str,
    run_dir: Path,
) -> None:
    """Connect, start heartbeats and control, run ``main`` until it returns or a stop arrives."""
    assert config.infra.nats_url and config.infra.redis_url, "resolve infra URLs before serving"
    timeout = config.infra.connect_timeout_seconds
    nc = await connect_nats(config.infra.nats_url, timeout, name=f"miles-{service}")
    redis = await connect_redis(config.infra.redis_url, timeout)
    bus = Bus(nc, run_id, service, config.infra.max_payload_bytes, config.infra.ack_wait_seconds)
    store = RunStore(redis, run_id)

    async def count_dead(reason: str) -> None:
        await store.count_dead_letter(reason)

    bus.on_dead_letter = count_dead
    ctx = ServiceContext(service, config, recipe, run_id, run_dir, bus, store, redis)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, ctx.stopping.set)
    await ctx._control()
    heartbeats = asyncio.create_task(ctx._heartbeat_loop())
    work = asyncio.ensure_future(main(ctx))
    stop = asyncio.create_task(ctx.stopping.wait())
    try:
        done, _ = await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            work.result()  # propagate a crash: the supervisor restarts us
        else:
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
    finally:
        ctx.stopping.set()
        stop.cancel()
        await heartbeats
        await ctx.store.heartbeat(ctx.heartbeat())
        # Not nc.drain(): a pull fetch that expired leaves its 408 status message unread in the
        # subscription's queue, and drain() waits for that queue until its 30 s timeout. What must
        # be durable was JetStream-acked already; flush sends the last acks before closing.
        await nc.flush()
        await nc.close()
        await redis.aclose()

"""What every service process shares: connections, heartbeats, time accounting and stopping.

A service's ``main`` receives a ``ServiceContext`` and reads as its control loop; everything
about being a well-behaved process on the bus lives here instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from miles import events, telemetry
from miles.config import MilesConfig
from miles.recipe import Recipe
from miles.runtime.bus import Bus, NatsBus, connect_nats
from miles.runtime.checkpoint import Manifests
from miles.runtime.run_record import ManifestsPort, RunStorePort
from miles.runtime.store import RunStore, connect_redis
from miles.runtime.subjects import Subjects
from miles.telemetry import Metrics, Phase, record
from miles.telemetry.record import BleedWindow

SERVICES = ("coordinator", "rollout", "reward", "buffer", "trainer")
"""The five services of a run, in the order `miles run` starts them."""

DEAD_LETTER_REASONS = (
    *events.BAD_EVENT_REASONS,
    "oversized",
    "non_finite_reward",
    "future_version",
)
"""Every reason a service dead-letters for (exported as 0 from the start)."""

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
    store: RunStorePort
    manifests: ManifestsPort
    metrics: Metrics
    instance: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    clock: Clock = field(default_factory=Clock)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    metrics_port: int = 0
    stopped_by: events.Control | None = None
    """The stop control event that stopped this service, if one did (not a signal)."""
    on_stop: list[Callable[[events.Control], Awaitable[None]]] = field(default_factory=list)
    """Awaited when a stop control event stopped the service, before its connections close:
    the coordinator records in the run record that the run was stopped, and why."""

    @property
    def subjects(self) -> Subjects:
        return self.bus.subjects

    @contextlib.contextmanager
    def busy(self, phase: Phase | None = None) -> Iterator[None]:
        """Working: counted in the heartbeat's busy seconds and, given one, under ``phase``."""
        with self.clock.busy(), self._phase(phase):
            yield

    @contextlib.contextmanager
    def waiting(
        self, phase: Phase | None = None, bleed: BleedWindow | None = None
    ) -> Iterator[None]:
        """Waiting for input: the heartbeat's waiting seconds, ``phase``, and the bleed."""
        with (
            self.clock.waiting(),
            self._phase(phase),
            bleed.waiting() if bleed else contextlib.nullcontext(),
        ):
            yield

    def _phase(self, phase: Phase | None) -> contextlib.AbstractContextManager[None]:
        return self.metrics.phase(phase) if phase else contextlib.nullcontext()

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
            metrics_port=self.metrics_port,
            metrics=self.metrics.snapshot(),
        )

    async def _poll_consumers(self) -> None:
        for state in await self.bus.consumer_infos():
            self.metrics.set_consumer_info(
                state.stream,
                state.durable,
                pending=state.pending,
                ack_pending=state.ack_pending,
                redelivered=state.redelivered,
            )

    async def _heartbeat_loop(self) -> None:
        period = self.config.coordinator.heartbeat_seconds
        while not self.stopping.is_set():
            await self._poll_consumers()
            beat = self.heartbeat()
            await self.bus.broadcast(
                self.subjects.heartbeat(self.service, self.instance), self._fits_bus(beat)
            )
            await self.store.heartbeat(beat)  # `miles status` works even without a coordinator
            status = await self.store.status()
            if status in ("finished", "failed", "drained"):
                log.info("run %s is %s; %s stops", self.run_id, status, self.service)
                self.stopping.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=period)

    def _fits_bus(self, beat: events.Heartbeat) -> events.Heartbeat:
        """The beat for the bus: without its metrics snapshot when that would make it exceed
        ``max_payload``. Liveness needs only who and when; the run record keeps it whole."""
        if len(events.encode(beat)) <= self.bus.max_payload:
            return beat
        return msgspec.structs.replace(beat, metrics={})

    async def _control(self) -> None:
        async def on_control(control: events.Control) -> None:
            if control.command == "stop":
                log.info("%s: stop requested (%s)", self.service, control.reason)
                self.stopped_by = control
                self.stopping.set()

        await self.bus.listen(self.subjects.control(), events.Control, on_control)


async def run_service(
    service: str,
    main: Callable[[ServiceContext], Awaitable[None]],
    config: MilesConfig,
    recipe: Recipe,
    run_id: str,
    run_dir: Path,
) -> None:
    """Connect, start heartbeats and control, run ``main`` until it returns or a stop arrives.

    Telemetry comes up first: tracing from the ``OTEL_*`` variables (nothing is installed
    without an exporter), and this process's metrics on ``infra.metrics_port``.
    """
    assert config.infra.nats_url and config.infra.redis_url, "resolve infra URLs before serving"
    timeout = config.infra.connect_timeout_seconds
    instance = f"{socket.gethostname()}-{os.getpid()}"
    telemetry.setup_tracing(service, run_id, instance)
    metrics = Metrics(service, run_id)
    record.expect(metrics.dead_letters, "reason", DEAD_LETTER_REASONS)
    metrics_port = 0
    if config.infra.metrics_port is not None:
        metrics_port = serve_metrics(metrics, config.infra.metrics_port, config.infra.metrics_addr)
        log.info("%s serves /metrics on port %d", service, metrics_port)
    nc = await connect_nats(config.infra.nats_url, timeout, name=f"miles-{service}")
    redis = await connect_redis(config.infra.redis_url, timeout)
    bus = NatsBus(
        nc, run_id, service, config.infra.max_payload_bytes, config.infra.ack_wait_seconds
    )
    store = RunStore(redis, run_id)

    async def count_dead(reason: str) -> None:
        metrics.dead_letters.labels(reason=reason).inc()
        await store.count_dead_letter(reason)

    bus.on_dead_letter = count_dead
    ctx = ServiceContext(
        service,
        config,
        recipe,
        run_id,
        run_dir,
        bus,
        store,
        Manifests(redis, run_id),
        metrics,
        instance=instance,
    )
    ctx.metrics_port = metrics_port
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
        if ctx.stopped_by is not None:
            for hook in ctx.on_stop:
                await hook(ctx.stopped_by)
        await ctx.store.heartbeat(ctx.heartbeat())
        # Not nc.drain(): a pull fetch that expired leaves its 408 status message unread in the
        # subscription's queue, and drain() waits for that queue until its 30 s timeout. What must
        # be durable was JetStream-acked already; flush sends the last acks before closing.
        await nc.flush()
        await nc.close()
        await redis.aclose()
        telemetry.shutdown_tracing()


def serve_metrics(metrics: Metrics, port: int, addr: str) -> int:
    """Serve /metrics on ``port``; if it is taken, on a free one (a warning says so, and the
    heartbeat advertises the port really bound)."""
    try:
        return telemetry.start_metrics_server(port, metrics.registry, addr)
    except OSError as exc:
        if not port:
            raise
        log.warning("/metrics port %d unavailable (%s); serving on a free port", port, exc)
        return telemetry.start_metrics_server(0, metrics.registry, addr)

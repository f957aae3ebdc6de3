"""The coordinator's watch over the run's processes: heartbeats heard on the bus, restart counts
read from the run record and exported, changes logged (the decisions are ``liveness.py``'s)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from miles import events
from miles.runtime.bus import Bus
from miles.runtime.run_record import RunStorePort
from miles.runtime.service import SERVICES
from miles.telemetry import Metrics, record
from services.coordinator.liveness import Liveness, Restarts

log = logging.getLogger("miles.coordinator")


class Watch:
    def __init__(
        self,
        bus: Bus,
        store: RunStorePort,
        metrics: Metrics,
        heartbeat_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bus, self.store, self.metrics = bus, store, metrics
        self.liveness = Liveness.for_period(heartbeat_seconds)
        self.restarts = Restarts(period=heartbeat_seconds)
        self.clock = clock
        record.expect(metrics.restarts, "restarted_service", SERVICES)

    async def start(self) -> None:
        async def on_beat(beat: events.Heartbeat) -> None:
            instance = f"{beat.service}/{beat.instance}"
            if self.liveness.beat(instance, self.clock()):
                log.info("%s is alive", instance)

        await self.bus.listen(self.bus.subjects.heartbeat("*", ">"), events.Heartbeat, on_beat)

    async def check(self) -> None:
        now = self.clock()
        for silence in self.liveness.check(now):
            log.warning("%s silent for %.0fs: presumed dead", silence.instance, silence.seconds)
        if self.restarts.due(now):
            for service, new in self.restarts.new(await self.store.restarts()).items():
                self.metrics.restarts.labels(restarted_service=service).inc(new)

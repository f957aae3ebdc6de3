"""Which service instances are alive, from their heartbeats on NATS, and how often `miles run`
restarted each service.

An instance is alive while its heartbeats keep coming; after ``missed`` periods of silence it is
presumed dead and the coordinator says so once (a restarted service joins as a new instance).
Restarts are counted by `miles run`'s supervisor in the run record; the coordinator exports them
as ``miles_restarts_total{restarted_service}``. The counts only grow, so a restarted coordinator
exporting them from scratch reads as no new restarts to Prometheus' ``increase``.
"""

from __future__ import annotations

import logging
import time

from miles import events
from miles.runtime.service import SERVICES, ServiceContext
from miles.telemetry import record

log = logging.getLogger("miles.coordinator")


class Liveness:
    def __init__(self, ctx: ServiceContext, missed: int = 3) -> None:
        self.ctx = ctx
        self.timeout = missed * ctx.config.coordinator.heartbeat_seconds
        self.last_seen: dict[str, float] = {}
        self.silent: set[str] = set()
        self.restarts: dict[str, int] = {}
        self.restarts_read = 0.0
        record.expect(ctx.metrics.restarts, "restarted_service", SERVICES)

    async def start(self) -> None:
        async def on_beat(beat: events.Heartbeat) -> None:
            key = f"{beat.service}/{beat.instance}"
            if key not in self.last_seen or key in self.silent:
                log.info("%s is alive", key)
            self.silent.discard(key)
            self.last_seen[key] = time.monotonic()

        await self.ctx.bus.listen(self.ctx.subjects.heartbeat("*", ">"), events.Heartbeat, on_beat)

    async def check(self) -> None:
        now = time.monotonic()
        for key, seen in self.last_seen.items():
            if key not in self.silent and now - seen > self.timeout:
                self.silent.add(key)
                log.warning("%s silent for %.0fs: presumed dead", key, now - seen)
        if now - self.restarts_read > self.ctx.config.coordinator.heartbeat_seconds:
            self.restarts_read = now
            for service, count in (await self.ctx.store.restarts()).items():
                new = count - self.restarts.get(service, 0)
                if new > 0:
                    self.ctx.metrics.restarts.labels(restarted_service=service).inc(new)
                    self.restarts[service] = count

    @property
    def alive(self) -> list[str]:
        return sorted(set(self.last_seen) - self.silent)

"""The training feed: reads the pacing counters from the run record, publishes what the pacing
allows (prompt tasks, or DPO's preference pairs: ``sources.py``) and records the dataset cursor
after each one (the I/O around ``pacing.py``)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from miles import telemetry
from miles.config import MilesConfig
from miles.runtime import faults
from miles.runtime.bus import Bus
from miles.runtime.run_record import RunStorePort
from miles.telemetry import Metrics
from services.coordinator.pacing import Pacing, Progress
from services.coordinator.sources import Dispatch, Source

BURST = 256
"""Tasks published concurrently before the cursor is recorded (a restart republishes at most
this many, deduplicated by JetStream)."""


class Feed:
    def __init__(
        self,
        bus: Bus,
        store: RunStorePort,
        metrics: Metrics,
        pacing: Pacing,
        source: Source,
        cursor: int = 0,
    ) -> None:
        self.bus, self.store, self.metrics = bus, store, metrics
        self.pacing = pacing
        self.source = source
        self.cursor = cursor
        self.progress = Progress()
        self.paused = False
        """An operator's `miles pause`: nothing is dispatched (a drain still completes)."""
        self.drain_step = 0
        """An operator's `miles drain`: the step the run stops at; 0: none."""

    @classmethod
    async def resume(
        cls,
        bus: Bus,
        store: RunStorePort,
        metrics: Metrics,
        config: MilesConfig,
        source: Source,
    ) -> Feed:
        """At the cursor the run record holds (0 for a new run), with the counters read."""
        cursor = (await store.record()).cursor
        feed = cls(bus, store, metrics, Pacing.from_config(config), source, cursor)
        await feed.refresh()
        return feed

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def drained(self) -> bool:
        return bool(self.drain_step) and self.step >= self.drain_step

    async def refresh(self) -> None:
        """Read the counters others own: steps committed by the trainer, groups the buffer
        dropped. Both are idempotent records in Redis, so a redelivered event counts once."""
        run = await self.store.record()
        self.progress = Progress(
            step=run.step,
            trained_groups=run.trained_groups,
            filtered_groups=await self.store.filtered_groups(),
        )
        self.paused, self.drain_step = bool(run.paused), run.drain_step
        self.metrics.step.set(self.progress.step)
        self.metrics.policy_version.set(self.progress.step)

    async def dispatch(self, evaluating: int | None = None) -> None:
        """Publish the tasks (or pairs) the bounds allow now, each the root of its own trace.

        Up to ``BURST`` at a time, concurrently, then the cursor once: a step's tasks reach
        the rollout together (one task a JetStream round trip behind the other would start
        generating a round early, alone) and the run record is written once per burst.

        The task id is the cursor, and the publish is deduplicated by it: a coordinator that
        dies between publishing and recording the cursor publishes the same tasks again, and
        JetStream keeps one copy of each.

        Paused, nothing; draining, only what completes the steps up to ``drain_step``.
        """
        if self.paused and not self.drain_step:
            return
        pacing = replace(self.pacing, steps=self.drain_step) if self.drain_step else self.pacing
        due = pacing.due(self.progress, self.cursor, evaluating)
        for start in range(due.start, due.stop, BURST):
            burst = [
                self.source.at(c, self.step) for c in range(start, min(start + BURST, due.stop))
            ]
            await asyncio.gather(*map(self._publish, burst))
            for _ in burst:
                faults.crash_point("coordinator.dispatched")
            self.cursor = start + len(burst)
            await self.store.update(cursor=self.cursor)

    async def _publish(self, out: Dispatch) -> None:
        with telemetry.root_span("dispatch", {"miles.task_id": out.task_id}):
            await self.bus.publish(out.subject, out.event, msg_id=out.msg_id)
        self.metrics.tasks_published.inc()

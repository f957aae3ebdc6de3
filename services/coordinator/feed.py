"""The training feed: reads the pacing counters from the run record, publishes the tasks the
pacing allows and records the dataset cursor after each one (the I/O around ``pacing.py``)."""

from __future__ import annotations

from miles import telemetry
from miles.config import MilesConfig
from miles.data import Prompt
from miles.runtime import faults
from miles.runtime.bus import Bus
from miles.runtime.run_record import RunStorePort
from miles.telemetry import Metrics
from services.coordinator.pacing import Pacing, Progress, training_task


class Feed:
    def __init__(
        self,
        bus: Bus,
        store: RunStorePort,
        metrics: Metrics,
        pacing: Pacing,
        prompts: list[Prompt],
        group_size: int,
        seed: int,
        cursor: int = 0,
    ) -> None:
        self.bus, self.store, self.metrics = bus, store, metrics
        self.pacing = pacing
        self.prompts = prompts
        self.group_size = group_size
        self.seed = seed
        self.cursor = cursor
        self.progress = Progress()

    @classmethod
    async def resume(
        cls,
        bus: Bus,
        store: RunStorePort,
        metrics: Metrics,
        config: MilesConfig,
        prompts: list[Prompt],
    ) -> Feed:
        """At the cursor the run record holds (0 for a new run), with the counters read."""
        cursor = (await store.record()).cursor
        pacing = Pacing.from_config(config)
        feed = cls(
            bus, store, metrics, pacing, prompts, config.rollout.group_size, config.run.seed, cursor
        )
        await feed.refresh()
        return feed

    @property
    def step(self) -> int:
        return self.progress.step

    async def refresh(self) -> None:
        """Read the counters others own: steps committed by the trainer, groups the buffer
        dropped. Both are idempotent records in Redis, so a redelivered event counts once."""
        run = await self.store.record()
        self.progress = Progress(
            step=run.step,
            trained_groups=run.trained_groups,
            filtered_groups=await self.store.filtered_groups(),
        )
        self.metrics.step.set(self.progress.step)
        self.metrics.policy_version.set(self.progress.step)

    async def dispatch(self) -> None:
        """Publish the tasks the bounds allow now, each the root of its own trace.

        The task id is the cursor, and the publish is deduplicated by it: a coordinator that
        dies between publishing and recording the cursor publishes the same task again, and
        JetStream keeps one copy.
        """
        for cursor in self.pacing.due(self.progress, self.cursor):
            task = training_task(
                self.bus.run_id, self.prompts, cursor, self.step, self.group_size, self.seed
            )
            with telemetry.root_span("dispatch", {"miles.task_id": task.task_id}):
                await self.bus.publish(self.bus.subjects.tasks, task, msg_id=task.task_id)
            self.metrics.tasks_published.inc()
            faults.crash_point("coordinator.dispatched")
            self.cursor = cursor + 1
            await self.store.update(cursor=self.cursor)

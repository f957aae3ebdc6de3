"""From a batch of tasks to generated groups: shared over the engines, generated, assembled.

Each engine that gets work generates its share of the batch in one go: the default rollout
batches every sample of the share into one engine call (which keeps a CPU engine busy), a
recipe's ``@miles.rollout`` runs once per task, concurrently.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from miles import events
from miles.config import RolloutConfig
from miles.engine.generation import EngineHandle, RolloutFn, rollout_many
from miles.runtime.bus import Message


@dataclass(frozen=True)
class Generated:
    """One engine's share, generated: a group of samples per task, in the share's order."""

    groups: list[list[events.Sample]]
    seconds: float
    engine: str


@dataclass(frozen=True)
class Share:
    """One engine's part of a batch and how to generate it: called with the engine (again on a
    retry, after the fleet recovered it)."""

    items: list[tuple[events.Task, Message]]
    custom: RolloutFn | None
    """The recipe's ``@miles.rollout``; ``None``: the default rollout."""
    config: RolloutConfig

    @property
    def tasks(self) -> list[events.Task]:
        return [task for task, _ in self.items]

    async def __call__(self, engine: EngineHandle) -> Generated:
        start = time.monotonic()
        if not self.items:
            return Generated([], 0.0, engine.name)
        if self.custom is None:
            groups = await rollout_many(engine, self.tasks, self.config)
        else:
            rollouts = (self.custom(engine, task, self.config) for task in self.tasks)
            groups = list(await asyncio.gather(*rollouts))
        return Generated(groups, time.monotonic() - start, engine.name)


def share_out(
    batch: Sequence[tuple[events.Task, Message]],
    engines: int,
    custom: RolloutFn | None,
    config: RolloutConfig,
) -> list[Share]:
    """Round robin: engine ``i`` gets tasks ``i``, ``i + engines``, ... (some may get none)."""
    return [Share(list(batch[i::engines]), custom, config) for i in range(engines)]


def group_of(
    run_id: str, task: events.Task, samples: list[events.Sample], generated: Generated
) -> events.GeneratedGroup:
    """The event for one task: its policy version is the oldest any of its samples began on."""
    return events.GeneratedGroup(
        run_id=run_id,
        policy_version=min(s.policy_version_first for s in samples),
        task_id=task.task_id,
        split=task.split,
        eval_round=task.eval_round,
        samples=samples,
        engine=generated.engine,
        generate_seconds=generated.seconds,
    )

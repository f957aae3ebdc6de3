"""A round takes the coordinator's whole burst of tasks, not just the first one to arrive."""

from __future__ import annotations

import asyncio

from miles import events
from miles.runtime.bus import MemoryBroker, MemoryBus
from miles.runtime.subjects import ROLLOUT_CONSUMER
from services.rollout.rounds import fetch_round


def task(index: int) -> events.Task:
    return events.Task(
        run_id="run",
        policy_version=0,
        task_id=f"t{index}",
        prompt="1+1=",
        label="2",
        group_size=2,
        seed=index,
    )


async def publish(bus: MemoryBus, indices: range) -> None:
    for index in indices:
        await bus.publish(bus.subjects.tasks, task(index), msg_id=f"t{index}")


async def test_tasks_right_behind_the_first_join_its_round_and_a_late_one_waits() -> None:
    bus = MemoryBus(MemoryBroker(), "run", "rollout")
    await bus.ensure_topology()
    tasks = await bus.pull("tasks", ROLLOUT_CONSUMER)
    await publish(bus, range(1))

    async def burst_then_late() -> None:
        await asyncio.sleep(0)  # the rest of the burst lands while the round is gathered
        await publish(bus, range(1, 4))
        await asyncio.sleep(1.0)  # long after the round started
        await publish(bus, range(4, 5))

    sender = asyncio.ensure_future(burst_then_late())
    first = await fetch_round(bus, tasks, size=10)
    await sender
    second = await fetch_round(bus, tasks, size=10)

    assert [t.task_id for t, _ in first] == ["t0", "t1", "t2", "t3"]
    assert [t.task_id for t, _ in second] == ["t4"]


async def test_a_round_holds_at_most_its_size() -> None:
    bus = MemoryBus(MemoryBroker(), "run", "rollout")
    await bus.ensure_topology()
    tasks = await bus.pull("tasks", ROLLOUT_CONSUMER)
    await publish(bus, range(12))

    assert len(await fetch_round(bus, tasks, size=8)) == 8
    assert len(await fetch_round(bus, tasks, size=8)) == 4

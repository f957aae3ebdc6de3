"""The in-memory twin beyond the contract (tests/contract/test_bus.py): subject matching, the
consumer's ``max_ack_pending``, and fetches woken by a publish rather than by their timeout."""

from __future__ import annotations

import asyncio
import time

import pytest

from miles import events
from miles.runtime.bus import MemoryBroker, MemoryBus
from miles.runtime.bus.broker import NoStream, matches
from miles.runtime.subjects import TRAINER_CONSUMER


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("miles.r.tasks", "miles.r.tasks", True),
        ("miles.r.tasks", "miles.r.tasks.x", False),
        ("miles.r.*", "miles.r.tasks", True),
        ("miles.r.*", "miles.r", False),
        ("miles.r.*", "miles.r.a.b", False),
        ("miles.r.heartbeat.*.>", "miles.r.heartbeat.rollout.host-1", True),
        ("miles.r.heartbeat.*.>", "miles.r.heartbeat.rollout.host.1", True),
        ("miles.r.heartbeat.*.>", "miles.r.heartbeat.rollout", False),
        ("miles.>", "miles.r", True),
        ("miles.>", "miles", False),
        ("miles.r.*", "miles.s.tasks", False),
    ],
)
def test_subject_matching_follows_nats(pattern: str, subject: str, expected: bool) -> None:
    assert matches(pattern, subject) is expected


def _batch(bus: MemoryBus, batch_id: str) -> events.Batch:
    return events.Batch(
        run_id=bus.run_id, policy_version=0, batch_id=batch_id, task_ids=[], samples=[]
    )


async def test_a_consumer_hands_out_no_more_than_max_ack_pending() -> None:
    bus = MemoryBus(MemoryBroker(), "run", "trainer", ack_wait=60)
    await bus.ensure_topology()
    for i in range(6):
        await bus.publish(bus.subjects.batches, _batch(bus, f"b{i}"), msg_id=f"b{i}")
    batches = await bus.pull("batches", TRAINER_CONSUMER)
    got = await bus.fetch(batches, events.Batch, 10, 0.01)
    assert [event.batch_id for event, _ in got] == ["b0", "b1", "b2", "b3"]  # max_ack_pending=4
    await got[0][1].ack()
    again = await bus.fetch(batches, events.Batch, 10, 0.01)
    assert [event.batch_id for event, _ in again] == ["b4"]


async def test_a_waiting_fetch_wakes_on_a_publish() -> None:
    bus = MemoryBus(MemoryBroker(), "run", "trainer")
    await bus.ensure_topology()
    batches = await bus.pull("batches", TRAINER_CONSUMER)
    started = time.monotonic()
    waiting = asyncio.ensure_future(bus.fetch(batches, events.Batch, 1, 5))
    await asyncio.sleep(0.01)
    await bus.publish(bus.subjects.batches, _batch(bus, "b0"), msg_id="b0")
    [(event, _)] = await waiting
    assert event.batch_id == "b0"
    assert time.monotonic() - started < 1


async def test_publishing_where_no_stream_is_fails_at_once() -> None:
    bus = MemoryBus(MemoryBroker(), "run", "trainer")
    with pytest.raises(NoStream):
        await bus.publish(bus.subjects.batches, _batch(bus, "b0"), msg_id="b0")


async def test_a_closed_bus_stops_listening() -> None:
    broker = MemoryBroker()
    listener, sender = MemoryBus(broker, "run", "a"), MemoryBus(broker, "run", "b")
    heard: list[str] = []

    async def on_control(control: events.Control) -> None:
        heard.append(control.reason)

    await listener.listen(listener.subjects.control(), events.Control, on_control)
    stop = events.Control(run_id="run", policy_version=-1, command="stop", reason="first")
    await sender.broadcast(sender.subjects.control("stop"), stop)
    await asyncio.sleep(0.01)
    await listener.close()
    await sender.broadcast(sender.subjects.control("stop"), stop)
    await asyncio.sleep(0.01)
    assert heard == ["first"]

"""The bus contract: one suite, run against JetStream ("nats") and the in-memory twin ("memory").

What a service relies on: publish and pull with explicit acks, a durable consumer shared by
replicas, redelivery after AckWait or a nak, ``in_progress``/``hold`` keeping a message, dedupe by
msg id, the payload bound, dead letters for what does not decode, broadcasts with wildcards, the
latest-message follower, and the consumers' counts.
"""

from __future__ import annotations

import asyncio
import io
import pickle
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from contract.bus_harness import MAX_PAYLOAD, BusHarness

from miles import events
from miles.runtime.bus import Bus, ConsumerState, Oversized, Received
from miles.runtime.subjects import COORDINATOR_CONSUMER, REWARD_CONSUMER, ROLLOUT_CONSUMER


def _task(bus: Bus, task_id: str = "t0", **fields: object) -> events.Task:
    return events.Task(
        run_id=bus.run_id, policy_version=0, task_id=task_id, prompt="1+1=", **fields
    )


def _generated(bus: Bus, task_id: str) -> events.GeneratedGroup:
    return events.GeneratedGroup(
        run_id=bus.run_id,
        policy_version=0,
        task_id=task_id,
        split="train",
        eval_round=-1,
        samples=[],
    )


def _weights(bus: Bus, version: int) -> events.WeightsPublished:
    return events.WeightsPublished(
        run_id=bus.run_id,
        policy_version=version,
        uri=f"file:///w/v{version}",
        sha256="0" * 64,
        step=version,
    )


async def _next(messages: AsyncIterator[Received]) -> Received:
    return await asyncio.wait_for(anext(messages), 5)


async def _eventually(check: Callable[[], Awaitable[bool]], seconds: float = 5.0) -> None:
    """Acks are fire-and-forget on NATS: the server counts them a moment later."""
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, "the broker never got there"
        await asyncio.sleep(0.02)


# --- publish, pull, ack -----------------------------------------------------------------------


async def test_published_events_are_pulled_in_order_and_acked(
    bus_harness: BusHarness, bus: Bus
) -> None:
    sent = [_task(bus, f"t{i}") for i in range(3)]
    for task in sent:
        await bus.publish(bus.subjects.tasks, task, msg_id=task.task_id)
    tasks = await bus.pull("tasks", ROLLOUT_CONSUMER)
    got = await bus.fetch(tasks, events.Task, 10, 5)
    assert [event for event, _ in got] == sent
    for event, msg in got:
        assert msg.subject == bus.subjects.tasks
        assert msg.headers is not None and msg.headers["Nats-Msg-Id"] == event.task_id
        assert msg.metadata.consumer == ROLLOUT_CONSUMER
        await msg.ack()
    await asyncio.sleep(bus_harness.ack_wait * 1.3)  # acked, so nothing comes back
    assert await bus.fetch(tasks, events.Task, 10, bus_harness.ack_wait / 2) == []
    assert await bus_harness.stored("tasks") == 3  # limits retention: the dispatch record stays


async def test_fetch_returns_nothing_after_its_timeout(bus_harness: BusHarness, bus: Bus) -> None:
    tasks = await bus.pull("tasks", ROLLOUT_CONSUMER)
    timeout = bus_harness.ack_wait / 2
    started = time.monotonic()
    assert await bus.fetch(tasks, events.Task, 4, timeout) == []
    assert timeout * 0.5 <= time.monotonic() - started < timeout + 2


async def test_pull_waits_until_the_consumer_exists(bus_harness: BusHarness) -> None:
    run_id = f"{bus_harness.run_id}-late"
    replica = await bus_harness.connect("reward", run_id)
    pulling = asyncio.ensure_future(replica.pull("generated", REWARD_CONSUMER))
    await asyncio.sleep(bus_harness.ack_wait)
    assert not pulling.done()
    await (await bus_harness.connect("coordinator", run_id)).ensure_topology()
    subscription = await asyncio.wait_for(pulling, 10)
    assert await replica.fetch(subscription, events.GeneratedGroup, 1, 0.1) == []


async def test_a_work_queue_message_goes_to_one_replica_and_is_gone_once_acked(
    bus_harness: BusHarness, bus: Bus
) -> None:
    first, second = await bus_harness.connect("reward-a"), await bus_harness.connect("reward-b")
    on_first = await first.pull("generated", REWARD_CONSUMER)
    on_second = await second.pull("generated", REWARD_CONSUMER)
    for i in range(10):
        await bus.publish(bus.subjects.generated, _generated(bus, f"t{i}"), msg_id=f"gen/t{i}")
    got_first = await first.fetch(on_first, events.GeneratedGroup, 4, 5)
    got_second = await second.fetch(on_second, events.GeneratedGroup, 10, 5)
    ids_first = [event.task_id for event, _ in got_first]
    ids_second = [event.task_id for event, _ in got_second]
    assert len(ids_first) == 4 and len(ids_second) == 6
    assert sorted(ids_first + ids_second) == sorted(f"t{i}" for i in range(10))
    assert await first.fetch(on_first, events.GeneratedGroup, 10, bus_harness.ack_wait / 2) == []
    for _, msg in got_first + got_second:
        await msg.ack()

    async def emptied() -> bool:
        return await bus_harness.stored("generated") == 0

    await _eventually(emptied)


# --- redelivery -------------------------------------------------------------------------------


async def test_an_unacked_message_is_redelivered_after_ack_wait(
    bus_harness: BusHarness, bus: Bus
) -> None:
    crashed, survivor = (
        await bus_harness.connect("rollout-a"),
        await bus_harness.connect("rollout-b"),
    )
    await bus.publish(bus.subjects.tasks, _task(bus), msg_id="t0")
    held = await crashed.fetch(await crashed.pull("tasks", ROLLOUT_CONSUMER), events.Task, 1, 5)
    assert [event.task_id for event, _ in held] == ["t0"]
    tasks = await survivor.pull("tasks", ROLLOUT_CONSUMER)
    assert await survivor.fetch(tasks, events.Task, 1, bus_harness.ack_wait / 4) == []
    again = await survivor.fetch(tasks, events.Task, 1, bus_harness.ack_wait * 3)
    assert [event for event, _ in again] == [event for event, _ in held]
    stream = bus.subjects.stream("tasks")
    assert await survivor.consumer_infos() == [ConsumerState(stream, ROLLOUT_CONSUMER, 0, 1, 1)]
    await again[0][1].ack()

    async def settled() -> bool:
        return await survivor.consumer_infos() == [ConsumerState(stream, ROLLOUT_CONSUMER, 0, 0, 0)]

    await _eventually(settled)


async def test_a_nak_redelivers_at_once(bus_harness: BusHarness, bus: Bus) -> None:
    await bus.publish(bus.subjects.tasks, _task(bus), msg_id="t0")
    tasks = await bus.pull("tasks", ROLLOUT_CONSUMER)
    [(_, msg)] = await bus.fetch(tasks, events.Task, 1, 5)
    await msg.nak()
    started = time.monotonic()
    again = await bus.fetch(tasks, events.Task, 1, bus_harness.ack_wait * 0.9)
    assert [event.task_id for event, _ in again] == ["t0"]
    assert time.monotonic() - started < bus_harness.ack_wait


async def test_in_progress_keeps_a_message_past_ack_wait(bus_harness: BusHarness, bus: Bus) -> None:
    other = await bus_harness.connect("rollout-b")
    await bus.publish(bus.subjects.tasks, _task(bus), msg_id="t0")
    [(_, msg)] = await bus.fetch(await bus.pull("tasks", ROLLOUT_CONSUMER), events.Task, 1, 5)
    for _ in range(4):  # 1.6 AckWaits in all
        await asyncio.sleep(bus_harness.ack_wait * 0.4)
        await msg.in_progress()
    tasks = await other.pull("tasks", ROLLOUT_CONSUMER)
    assert await other.fetch(tasks, events.Task, 1, bus_harness.ack_wait * 0.3) == []
    await msg.ack()
    assert await other.fetch(tasks, events.Task, 1, bus_harness.ack_wait * 1.5) == []


async def test_hold_keeps_messages_while_the_work_runs(bus_harness: BusHarness, bus: Bus) -> None:
    other = await bus_harness.connect("rollout-b")
    await bus.publish(bus.subjects.tasks, _task(bus), msg_id="t0")
    [(_, msg)] = await bus.fetch(await bus.pull("tasks", ROLLOUT_CONSUMER), events.Task, 1, 5)

    async def work() -> str:
        await asyncio.sleep(bus_harness.ack_wait * 2)
        return "done"

    assert await bus.hold(work(), [msg]) == "done"
    tasks = await other.pull("tasks", ROLLOUT_CONSUMER)
    assert await other.fetch(tasks, events.Task, 1, bus_harness.ack_wait * 0.3) == []


# --- dedupe and the payload bound -------------------------------------------------------------


async def test_same_msg_id_is_stored_once(bus_harness: BusHarness, bus: Bus) -> None:
    await bus.publish(bus.subjects.tasks, _task(bus, "t0"), msg_id="t0")
    await bus.publish(bus.subjects.tasks, _task(bus, "t0"), msg_id="t0")  # a retried publish
    await bus.publish(bus.subjects.tasks, _task(bus, "t1"), msg_id="t1")
    assert await bus_harness.stored("tasks") == 2
    got = await bus.fetch(await bus.pull("tasks", ROLLOUT_CONSUMER), events.Task, 10, 5)
    assert [event.task_id for event, _ in got] == ["t0", "t1"]


async def test_oversized_publish_is_refused_and_dead_lettered(
    bus_harness: BusHarness, bus: Bus
) -> None:
    task = events.Task(
        run_id=bus.run_id, policy_version=0, task_id="big", prompt="x" * (MAX_PAYLOAD + 1)
    )
    with pytest.raises(ValueError, match=r"Task is \d+ bytes, over max_payload"):
        await bus.publish(bus.subjects.tasks, task, msg_id="big")
    assert await bus_harness.stored("tasks") == 0
    with pytest.raises(Oversized):
        await bus.broadcast(bus.subjects.control("stop"), task)
    assert bus.dead_letters == 2
    records = await bus_harness.dead("probe", 2)
    assert [(r.reason, r.subject) for r in records] == [
        ("oversized", bus.subjects.tasks),
        ("oversized", bus.subjects.control("stop")),
    ]
    payload = events.encode(task)
    for record in records:
        assert 0 < len(record.payload) <= 4096 and payload.startswith(record.payload)
        assert "over max_payload" in record.detail


# --- dead letters -----------------------------------------------------------------------------


class _CreatesFile:
    """A pickle that creates ``path`` when (and only when) it is unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.path,))


async def test_bad_payloads_are_dead_lettered_and_acked(
    bus_harness: BusHarness, bus: Bus, tmp_path: Path
) -> None:
    counted: list[str] = []

    async def count(reason: str) -> None:
        counted.append(reason)

    bus.on_dead_letter = count
    marker = tmp_path / "unpickled"
    good = events.StepCommitted(
        run_id=bus.run_id,
        policy_version=1,
        step=1,
        batch_id="b",
        task_ids=["t0"],
        sample_ids=["t0/0"],
        reward_mean=0.5,
        loss=0.1,
        grad_norm=1.0,
        kl=0.0,
    )
    bad = {
        "not_msgpack": b"\xc1\xc1 not msgpack",
        "pickle": pickle.dumps(_CreatesFile(marker)),
        "schema": msgspec.msgpack.encode({"kind": "step", "run_id": bus.run_id}),
        "run_id": events.encode(msgspec.structs.replace(good, run_id="someone-else")),
        "schema_version": events.encode(msgspec.structs.replace(good, schema=99)),
        "type": events.encode(_task(bus)),
    }
    for reason, payload in bad.items():
        await bus_harness.inject(bus.subjects.steps, payload, msg_id=reason)
    await bus.publish(bus.subjects.steps, good, msg_id="good")

    inbox = await bus.pull("ledger", COORDINATOR_CONSUMER)
    received: list[events.StepCommitted] = []
    for _ in range(10):
        for event, msg in await bus.fetch(inbox, events.StepCommitted, 10, 1):
            received.append(event)
            await msg.ack()
        if bus.dead_letters == len(bad) and received:
            break
    assert received == [good]
    assert bus.dead_letters == len(bad)
    assert sorted(counted) == sorted(bad)
    assert not marker.exists(), "a pickle payload was unpickled"

    # Acked, not merely dropped: after the ack wait nothing is redelivered.
    await asyncio.sleep(bus_harness.ack_wait * 1.3)
    assert await bus.fetch(inbox, events.StepCommitted, 10, bus_harness.ack_wait / 2) == []
    ledger = bus.subjects.stream("ledger")
    assert await bus.consumer_infos() == [ConsumerState(ledger, COORDINATOR_CONSUMER, 0, 0, 0)]

    records = await bus_harness.dead("probe", len(bad))
    assert {r.reason: r.payload for r in records} == bad
    for record in records:
        assert record.run_id == bus.run_id
        assert record.service == "probe"
        assert record.subject == bus.subjects.steps
        assert record.detail


# --- broadcasts -------------------------------------------------------------------------------


async def test_listen_matches_wildcards_and_dead_letters_what_does_not_decode(
    bus_harness: BusHarness, bus: Bus
) -> None:
    sender = await bus_harness.connect("sender")
    controls: asyncio.Queue[events.Control] = asyncio.Queue()
    beats: asyncio.Queue[events.Heartbeat] = asyncio.Queue()

    async def on_control(control: events.Control) -> None:
        controls.put_nowait(control)

    async def on_beat(beat: events.Heartbeat) -> None:
        beats.put_nowait(beat)

    await bus.listen(bus.subjects.control(), events.Control, on_control)  # control.*
    await bus.listen(bus.subjects.heartbeat("*", ">"), events.Heartbeat, on_beat)

    def control(reason: str) -> events.Control:
        return events.Control(run_id=bus.run_id, policy_version=-1, command="stop", reason=reason)

    def beat(instance: str) -> events.Heartbeat:
        return events.Heartbeat(
            run_id=bus.run_id,
            policy_version=-1,
            service="rollout",
            instance=instance,
            pid=1,
            time=0.0,
            busy_seconds=0.0,
            wait_seconds=0.0,
            processed=0,
        )

    # Core NATS is at-most-once: a probe on each listener first (sent until it is heard, as
    # the full suite once lost the first messages to a fresh subscription under load), so what
    # follows tests the matching, not the start-up.
    async def heard(queue: asyncio.Queue[Any], send: Callable[[], Awaitable[None]]) -> None:
        for _ in range(100):
            await send()
            try:
                await asyncio.wait_for(queue.get(), 0.2)
                return
            except TimeoutError:
                continue
        raise AssertionError("a listener never heard its probe")

    await heard(controls, lambda: sender.broadcast(bus.subjects.control("probe"), control("p")))
    await heard(beats, lambda: sender.broadcast(bus.subjects.heartbeat("p", "p"), beat("p")))
    await asyncio.sleep(0.3)  # probes sent twice arrive late here, not below
    while not controls.empty():
        controls.get_nowait()
    while not beats.empty():
        beats.get_nowait()

    root = bus.subjects.root
    # Not for these listeners: `*` is one token, `>` at least one, and another run is another.
    await sender.broadcast(f"{root}.control.stop.now", control("two tokens"))
    await sender.broadcast(f"miles.{bus.run_id}x.control.stop", control("another run"))
    await sender.broadcast(f"{root}.heartbeat.rollout", beat("no instance"))
    # Does not decode as a heartbeat: dead-lettered by the listener, never handed on.
    await sender.broadcast(bus.subjects.heartbeat("rollout", "bad"), control("not a beat"))
    await sender.broadcast(bus.subjects.control("stop"), control("one token"))
    await sender.broadcast(f"{root}.heartbeat.rollout.host.1", beat("two tokens under >"))

    assert (await asyncio.wait_for(controls.get(), 20)).reason == "one token"
    assert (await asyncio.wait_for(beats.get(), 20)).instance == "two tokens under >"
    await asyncio.sleep(0.05)
    assert controls.empty() and beats.empty()
    assert bus.dead_letters == 1
    [record] = await bus_harness.dead("probe", 1)
    assert (record.reason, record.subject) == ("type", bus.subjects.heartbeat("rollout", "bad"))


# --- following the latest message -------------------------------------------------------------


async def test_subscribe_latest_sees_the_last_message_then_every_new_one(
    bus_harness: BusHarness, bus: Bus
) -> None:
    weights = bus.subjects.weights
    empty = await bus.subscribe_latest(weights)  # nothing yet: the first publish comes first
    for version in (1, 2):
        await bus.publish(weights, _weights(bus, version), msg_id=f"weights/v{version}")
    follower = await (await bus_harness.connect("rollout-b")).subscribe_latest(weights)
    first = await _next(follower)
    assert events.decode(first.data, events.WeightsPublished, bus.run_id) == _weights(bus, 2)
    assert first.subject == weights
    assert first.headers is not None and first.headers["Nats-Msg-Id"] == "weights/v2"
    await bus.publish(weights, _weights(bus, 3), msg_id="weights/v3")
    following = [await _next(follower), *[await _next(empty) for _ in range(3)]]
    versions = [events.decode(m.data, events.WeightsPublished, bus.run_id) for m in following]
    assert [event.policy_version for event in versions] == [3, 1, 2, 3]


# --- consumers and object buckets -------------------------------------------------------------


async def test_consumer_infos_count_pending_ack_pending_and_redelivered(
    bus_harness: BusHarness, bus: Bus
) -> None:
    assert await bus.consumer_infos() == []  # only the consumers this process pulls from
    for i in range(3):
        await bus.publish(bus.subjects.tasks, _task(bus, f"t{i}"), msg_id=f"t{i}")
    tasks = await bus.pull("tasks", ROLLOUT_CONSUMER)
    stream = bus.subjects.stream("tasks")
    assert await bus.consumer_infos() == [ConsumerState(stream, ROLLOUT_CONSUMER, 3, 0, 0)]
    [(_, msg)] = await bus.fetch(tasks, events.Task, 1, 5)
    assert await bus.consumer_infos() == [ConsumerState(stream, ROLLOUT_CONSUMER, 2, 1, 0)]
    await msg.nak()
    # Which comes first, the nak'ed one or the next new one, JetStream does not promise.
    seen: list[str] = []
    while sorted(seen) != ["t0", "t1", "t2"]:
        seen += [event.task_id for event, _ in await bus.fetch(tasks, events.Task, 3, 5)]
    assert await bus.consumer_infos() == [ConsumerState(stream, ROLLOUT_CONSUMER, 0, 3, 1)]


async def test_object_buckets_hold_named_blobs(bus: Bus) -> None:
    blob = bytes(range(256)) * 2048  # several of JetStream's 128 KiB chunks
    bucket = await bus.objects(f"miles_{bus.run_id}_blobs")
    await bucket.put("weights/v1/model.safetensors", io.BytesIO(blob))
    again = await bus.objects(f"miles_{bus.run_id}_blobs")  # the same bucket, not a new one
    into = io.BytesIO()
    await again.get("weights/v1/model.safetensors", into)
    assert into.getvalue() == blob


async def test_object_buckets_list_and_delete_by_name(bus: Bus) -> None:
    bucket = await bus.objects(f"miles_{bus.run_id}_blobs")
    assert await bucket.names("") == []  # a new bucket is empty
    for name in ("weights/v1/a", "weights/v1/b", "weights/v2/a", "state/s1/a"):
        await bucket.put(name, io.BytesIO(name.encode()))
    assert await bucket.names("weights/") == ["weights/v1/a", "weights/v1/b", "weights/v2/a"]
    await bucket.delete("weights/v1/a")
    await bucket.delete("weights/v1/a")  # gone already: a no-op
    await bucket.delete("never/was")
    assert await bucket.names("weights/v1/") == ["weights/v1/b"]
    with pytest.raises(FileNotFoundError):
        await bucket.get("weights/v1/a", io.BytesIO())

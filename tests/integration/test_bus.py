"""NatsBus against a real nats-server, beyond the contract (tests/contract/test_bus.py, which runs
against it too): the topology as JetStream holds it, and dead letters counted in the run record."""

import asyncio
import pickle
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from miles import events
from miles.runtime import embedded
from miles.runtime.bus import DeadLetter, NatsBus, connect_nats, topology
from miles.runtime.store import RunStore

pytestmark = pytest.mark.integration

MAX_PAYLOAD = 8 * 1024 * 1024  # the config default, and the embedded server's max_payload


@pytest.fixture
async def bus(nats_server: embedded.Server) -> AsyncIterator[NatsBus]:
    nc = await connect_nats(nats_server.url, 5, name="test-bus")
    bus = NatsBus(nc, f"run-{uuid.uuid4().hex[:8]}", "probe", MAX_PAYLOAD)
    await bus.ensure_topology()
    yield bus
    await nc.close()


def _task(bus: NatsBus, task_id: str = "t0", **fields: object) -> events.Task:
    return events.Task(
        run_id=bus.run_id, policy_version=0, task_id=task_id, prompt="1+1=", **fields
    )


async def test_ensure_topology_is_idempotent(bus: NatsBus) -> None:
    streams, consumers = topology(bus.subjects)

    async def snapshot() -> dict[str, object]:
        state: dict[str, object] = {}
        for spec in streams:
            info = await bus.js.stream_info(bus.subjects.stream(spec.kind))
            state[spec.kind] = (info.config.subjects, info.config.retention, info.state.messages)
        for spec in consumers:
            info = await bus.js.consumer_info(bus.subjects.stream(spec.stream_kind), spec.durable)
            state[spec.durable] = (info.config.ack_wait, info.config.max_ack_pending)
        return state

    await bus.publish(bus.subjects.tasks, _task(bus), msg_id="t0")
    before = await snapshot()
    await bus.ensure_topology()  # a restarted coordinator: nothing is recreated or purged
    assert await snapshot() == before
    assert before["tasks"][2] == 1  # type: ignore[index]
    assert before["rollout"] == (bus.ack_wait, 1024)


class _CreatesFile:
    """A pickle that creates ``path`` when (and only when) it is unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.path,))


async def test_bad_inputs_are_dead_lettered_acked_and_counted(
    bus: NatsBus, redis_server: embedded.Server, tmp_path: Path
) -> None:
    from miles.runtime.store import connect_redis

    redis = await connect_redis(redis_server.url, 5)
    store = RunStore(redis, bus.run_id)

    async def count_dead(reason: str) -> None:  # wired as run_service wires it
        await store.count_dead_letter(reason)

    bus.on_dead_letter = count_dead

    # Our own consumer on the ledger's step subject, with a 1 s ack wait so that a message the
    # bus forgot to ack would come back within the test.
    ledger = bus.subjects.stream("ledger")
    await bus.js.add_consumer(
        ledger,
        ConsumerConfig(
            durable_name="probe",
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=1,
            filter_subject=bus.subjects.steps,
        ),
    )
    subscription = await bus.pull("ledger", "probe")

    marker = tmp_path / "unpickled"
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_CreatesFile(control)))
    assert control.exists(), "the pickle payload must be one that would act when unpickled"

    steps = bus.subjects.steps
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
        await bus.js.publish(steps, payload, headers={"Nats-Msg-Id": reason})
    await bus.publish(steps, good, msg_id="good")

    received: list[events.StepCommitted] = []
    for _ in range(10):
        for event, msg in await bus.fetch(subscription, events.StepCommitted, 10, 1):
            received.append(event)
            await msg.ack()
        if bus.dead_letters == len(bad) and received:
            break
    assert received == [good]
    assert bus.dead_letters == len(bad)
    assert not marker.exists(), "a pickle payload was unpickled"

    # Acked, not merely dropped: after the ack wait nothing is redelivered.
    await asyncio.sleep(1.3)
    assert await bus.fetch(subscription, events.StepCommitted, 10, 0.5) == []
    info = await bus.js.consumer_info(ledger, "probe")
    assert (info.num_pending, info.num_ack_pending, info.num_redelivered) == (0, 0, 0)

    # Each rejection is readable on miles.<run>.dead.<service>, in the "dead" stream.
    dead = await bus.js.pull_subscribe(
        bus.subjects.dead("probe"), stream=bus.subjects.stream("dead")
    )
    records = [
        msgspec.msgpack.decode(msg.data, type=DeadLetter)
        for msg in await dead.fetch(len(bad), timeout=5)
    ]
    assert {r.reason: r.payload for r in records} == bad
    for record in records:
        assert record.run_id == bus.run_id
        assert record.service == "probe"
        assert record.subject == steps
        assert record.detail
    assert await store.dead_letters() == dict.fromkeys(bad, 1)
    await redis.aclose()

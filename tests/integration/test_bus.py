"""NatsBus against a real nats-server, beyond the contract (tests/contract/test_bus.py, which runs
against it too): the topology as JetStream holds it, and dead letters counted in the run record."""

import uuid
from collections.abc import AsyncIterator

import msgspec
import pytest

from miles import events
from miles.runtime import embedded
from miles.runtime.bus import NatsBus, connect_nats, topology
from miles.runtime.store import RunStore, connect_redis
from miles.runtime.subjects import COORDINATOR_CONSUMER

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


async def test_dead_letters_are_counted_in_the_run_record(
    bus: NatsBus, redis_server: embedded.Server
) -> None:
    """Rejection, ack and the dead-letter record are the contract's (tests/contract/test_bus.py,
    run against nats-server too); here the count per reason reaches Redis, as ``run_service``
    wires the hook."""
    redis = await connect_redis(redis_server.url, 5)
    store = RunStore(redis, bus.run_id)

    async def count_dead(reason: str) -> None:
        await store.count_dead_letter(reason)

    bus.on_dead_letter = count_dead
    inbox = await bus.pull("ledger", COORDINATOR_CONSUMER)
    bad = {
        "not_msgpack": b"\xc1\xc1 not msgpack",
        "schema": msgspec.msgpack.encode({"kind": "step", "run_id": bus.run_id}),
        "type": events.encode(_task(bus)),
    }
    for reason, payload in bad.items():
        await bus.js.publish(bus.subjects.steps, payload, headers={"Nats-Msg-Id": reason})
    for _ in range(10):
        assert await bus.fetch(inbox, events.StepCommitted, 10, 1) == []
        if bus.dead_letters == len(bad):
            break
    assert await store.dead_letters() == dict.fromkeys(bad, 1)
    await redis.aclose()

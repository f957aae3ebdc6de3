"""The bus contract's harnesses, one per implementation: a real nats-server and the in-memory twin.

A ``BusHarness`` is what a test needs beyond the port itself: connecting more "processes" (replicas)
to the same server, and reading or writing the streams raw, as an operator (or an attacker
publishing garbage) would.
"""

from __future__ import annotations

import uuid
from typing import Protocol

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from miles.runtime.bus import Bus, DeadLetter, MemoryBroker, MemoryBus, NatsBus, connect_nats
from miles.runtime.subjects import Subjects

MAX_PAYLOAD = 8 * 1024 * 1024  # the config default, and the embedded server's max_payload


class BusHarness(Protocol):
    run_id: str
    ack_wait: float
    """Short, so redelivery tests wait a moment; consumers are made with it."""

    async def connect(self, service: str, run_id: str | None = None) -> Bus:
        """Another process's bus on the same broker (the topology is not created)."""
        ...

    async def inject(self, subject: str, payload: bytes, msg_id: str) -> None:
        """Store raw bytes on a stream, bypassing the bus's checks."""
        ...

    async def stored(self, stream_kind: str) -> int:
        """How many messages the stream holds now."""
        ...

    async def dead(self, service: str, count: int) -> list[DeadLetter]:
        """The first ``count`` dead-letter records of ``service``."""
        ...

    async def close(self) -> None: ...


class NatsBusHarness:
    ack_wait = 1.0  # long enough that a loaded machine does not redeliver by accident

    def __init__(self, nc: NATS, url: str) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.url = url
        self.run_id = f"run-{uuid.uuid4().hex[:8]}"
        self.connections: list[NATS] = [nc]

    async def connect(self, service: str, run_id: str | None = None) -> Bus:
        nc = await connect_nats(self.url, 5, name=f"contract-{service}")
        self.connections.append(nc)
        return NatsBus(nc, run_id or self.run_id, service, MAX_PAYLOAD, self.ack_wait)

    async def inject(self, subject: str, payload: bytes, msg_id: str) -> None:
        await self.js.publish(subject, payload, headers={"Nats-Msg-Id": msg_id})

    async def stored(self, stream_kind: str) -> int:
        info = await self.js.stream_info(Subjects(self.run_id).stream(stream_kind))
        return info.state.messages

    async def dead(self, service: str, count: int) -> list[DeadLetter]:
        subjects = Subjects(self.run_id)
        reader = await self.js.pull_subscribe(
            subjects.dead(service), stream=subjects.stream("dead")
        )
        messages = await reader.fetch(count, timeout=5)
        return [msgspec.msgpack.decode(msg.data, type=DeadLetter) for msg in messages[:count]]

    async def close(self) -> None:
        for nc in self.connections:
            await nc.close()


class MemoryBusHarness:
    ack_wait = 0.05

    def __init__(self) -> None:
        self.broker = MemoryBroker()
        self.run_id = f"run-{uuid.uuid4().hex[:8]}"
        self.buses: list[MemoryBus] = []

    async def connect(self, service: str, run_id: str | None = None) -> Bus:
        bus = MemoryBus(self.broker, run_id or self.run_id, service, MAX_PAYLOAD, self.ack_wait)
        self.buses.append(bus)
        return bus

    async def inject(self, subject: str, payload: bytes, msg_id: str) -> None:
        self.broker.store(subject, payload, {"Nats-Msg-Id": msg_id})

    async def stored(self, stream_kind: str) -> int:
        return len(self.broker.streams[Subjects(self.run_id).stream(stream_kind)].messages)

    async def dead(self, service: str, count: int) -> list[DeadLetter]:
        subjects = Subjects(self.run_id)
        stream = self.broker.streams[subjects.stream("dead")]
        found = [m.data for m in stream.messages.values() if m.subject == subjects.dead(service)]
        return [msgspec.msgpack.decode(data, type=DeadLetter) for data in found[:count]]

    async def close(self) -> None:
        for bus in self.buses:
            await bus.close()

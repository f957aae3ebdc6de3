"""What a service may ask of the bus, as Protocols, and the behaviour both implementations share.

``NatsBus`` (JetStream) and ``MemoryBus`` (its in-memory twin) satisfy ``Bus``; the contract
suite (tests/contract/test_bus.py) holds them to the same behaviour. No NATS type crosses this
port: subscriptions, messages, consumer states and object buckets are Protocols or carriers here.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol, TypeVar

import msgspec
from opentelemetry.trace import Link, Span

from miles import events, telemetry
from miles.runtime.subjects import Subjects

E = TypeVar("E", bound=events.Event)
T = TypeVar("T")


class Oversized(ValueError):
    """An event larger than ``infra.max_payload_bytes``; it was dead-lettered, not published."""


class DeadLetter(msgspec.Struct, kw_only=True):
    """What the dead-letter subject records: never decoded further, never unpickled."""

    run_id: str
    service: str
    reason: str
    detail: str
    subject: str
    payload: bytes
    time: float


@dataclass(frozen=True)
class ConsumerState:
    """A durable consumer as the broker sees it, for the queue-depth metrics."""

    stream: str
    durable: str
    pending: int
    """Messages not yet delivered to anyone."""
    ack_pending: int
    """Delivered, not yet acked."""
    redelivered: int
    """Delivered more than once and still not acked."""


class Received(Protocol):
    """A message as read from a subject: what an ordered (unacked) consumer hands out."""

    @property
    def subject(self) -> str: ...

    @property
    def data(self) -> bytes: ...

    @property
    def headers(self) -> Mapping[str, str] | None: ...


class Metadata(Protocol):
    @property
    def consumer(self) -> str | None: ...


class Message(Received, Protocol):
    """One delivered message of a durable consumer: acked, nak'ed (redeliver now) or kept
    (``in_progress`` resets its AckWait)."""

    @property
    def metadata(self) -> Metadata: ...

    async def ack(self) -> None: ...

    async def nak(self, delay: float | None = None) -> None: ...

    async def in_progress(self) -> None: ...


class Subscription(Protocol):
    """A binding to a durable pull consumer; replicas bound to the same one share its messages."""

    async def fetch(self, batch: int, timeout: float) -> Sequence[Message]: ...


class ObjectBucket(Protocol):
    """Named objects too large for an event (JetStream's Object Store), streamed in and out."""

    async def put(self, name: str, source: io.BufferedIOBase) -> None: ...

    async def get(self, name: str, into: io.BufferedIOBase) -> None:
        """Stream object ``name`` into ``into``; ``FileNotFoundError`` when there is none."""
        ...

    async def names(self, prefix: str) -> list[str]:
        """The names of the objects that start with ``prefix``."""
        ...

    async def delete(self, name: str) -> None:
        """Remove object ``name``; a no-op when there is none."""
        ...


class ObjectBuckets(Protocol):
    async def objects(self, bucket: str) -> ObjectBucket:
        """The bucket named ``bucket``, created on first use."""
        ...


class Bus(ObjectBuckets, Protocol):
    """One service's view of the run's streams, broadcasts and object buckets."""

    subjects: Subjects
    run_id: str
    service: str
    ack_wait: float
    max_payload: int
    dead_letters: int
    on_dead_letter: Callable[[str], Awaitable[None]] | None

    async def ensure_topology(self) -> None:
        """Create this run's streams and consumers (``topology``); safe to call again."""
        ...

    async def pull(self, stream_kind: str, durable: str) -> Subscription:
        """Bind to a durable consumer, waiting until the coordinator made it."""
        ...

    async def fetch(
        self, subscription: Subscription, expected: events.Expected[E], batch: int, timeout: float
    ) -> list[tuple[E, Message]]:
        """Up to ``batch`` decoded messages, [] after ``timeout``; bad ones are dead-lettered
        and acked here."""
        ...

    async def publish(self, subject: str, event: events.Event, msg_id: str) -> None:
        """Store durably, deduplicated by ``msg_id``; over ``max_payload``: dead-letter and
        raise ``Oversized``."""
        ...

    def process(
        self, msg: Message, links: Sequence[Link] = (), start_time: int | None = None
    ) -> AbstractContextManager[Span]:
        """The ``process <subject>`` span of handling one pulled message, made current."""
        ...

    async def hold(self, work: Awaitable[T], messages: Sequence[Message]) -> T:
        """``work`` while keeping ``messages`` ours (no redelivery)."""
        ...

    async def dead_letter(self, subject: str, payload: bytes, reason: str, detail: str) -> None:
        """Record a rejected input on ``subjects.dead(service)`` and count it; never raises."""
        ...

    async def broadcast(self, subject: str, event: events.Event) -> None:
        """Fire-and-forget to whoever listens now (heartbeats, control, notices)."""
        ...

    async def listen(
        self, subject: str, expected: type[E], handler: Callable[[E], Awaitable[None]]
    ) -> None:
        """Call ``handler`` with every decoded broadcast on ``subject`` (``*``, ``>`` allowed)."""
        ...

    async def subscribe_latest(self, subject: str) -> AsyncIterator[Received]:
        """The last message stored on ``subject``, then every new one: every caller sees every
        update (the rollout replicas following the weights)."""
        ...

    async def consumer_infos(self) -> list[ConsumerState]:
        """The consumers this process pulls from; the ones unreadable now are left out."""
        ...


# --- shared by both implementations --------------------------------------------------------


def oversized(event: events.Event, payload: bytes, max_payload: int) -> str | None:
    """Why ``payload`` may not be sent, or None."""
    if len(payload) <= max_payload:
        return None
    return f"{type(event).__name__} is {len(payload)} bytes, over max_payload"


def dead_letter_record(
    bus: Bus, subject: str, payload: bytes, reason: str, detail: str
) -> DeadLetter:
    """The record keeps the head of the payload, small enough to fit under ``max_payload``."""
    room = max(0, min(4096, bus.max_payload // 2))
    return DeadLetter(
        run_id=bus.run_id,
        service=bus.service,
        reason=reason,
        detail=detail[: room // 4],
        subject=subject,
        payload=payload[:room],
        time=time.time(),
    )


async def decode_fetched(
    bus: Bus, messages: Sequence[Message], expected: events.Expected[E]
) -> list[tuple[E, Message]]:
    """Decode what a fetch returned; what fails is dead-lettered and acked, never redelivered."""
    good: list[tuple[E, Message]] = []
    for msg in messages:
        try:
            good.append((events.decode(msg.data, expected, bus.run_id), msg))
        except events.BadEvent as exc:
            with bus.process(msg):
                await bus.dead_letter(msg.subject, msg.data, exc.reason, exc.detail)
                await msg.ack()
    return good


def process_span(
    msg: Message, links: Sequence[Link] = (), start_time: int | None = None
) -> AbstractContextManager[Span]:
    """Parented by the publisher's ``send`` span (from the headers), so whatever the handler
    publishes joins the same trace; the consumer group is the durable consumer the replicas
    share. ``start_time`` (ns since the epoch) backdates it, for handlers that open it after
    batched work."""
    headers = msg.headers or {}
    return telemetry.process_span(
        msg.subject,
        headers.get("Nats-Msg-Id", ""),
        msg.metadata.consumer or "",
        headers,
        links,
        start_time,
    )


async def hold(work: Awaitable[T], messages: Sequence[Message], every: float) -> T:
    """Run ``work`` while telling the broker we still hold ``messages`` (no redelivery)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=every)
        if done:
            return task.result()
        for msg in messages:
            await msg.in_progress()

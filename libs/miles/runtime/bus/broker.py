"""The in-memory nats-server behind ``MemoryBus``: JetStream's semantics, as far as miles relies
on them, in one process.

A ``MemoryBroker`` holds streams (limits or work-queue retention, a ``Nats-Msg-Id`` dedupe
window), durable pull consumers (explicit ack, AckWait redelivery, ``max_ack_pending``, replicas
bound to one consumer share its messages), core subjects for broadcasts, ordered consumers that
follow a subject, and object buckets. Each ``MemoryBus`` is one service's connection to it, so
several "processes" share a broker as they share a server.

Where it departs: publishing to a subject no stream takes raises ``NoStream`` at once (NATS
answers "no responders", which ``NatsBus`` retries for a minute), and nothing is persisted.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field

from miles.runtime.bus.port import ConsumerState, Message
from miles.runtime.bus.topology import DEDUPE_WINDOW_SECONDS, ConsumerSpec, StreamSpec, topology
from miles.runtime.subjects import Subjects


class NoStream(LookupError):
    """No stream takes the subject (the topology was not created)."""


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a final ``>`` one or more."""
    wanted, tokens = pattern.split("."), subject.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > index
        if index >= len(tokens) or token not in ("*", tokens[index]):
            return False
    return len(wanted) == len(tokens)


@dataclass(frozen=True)
class Envelope:
    """A message as the broker holds it (satisfies ``port.Received``)."""

    subject: str
    data: bytes
    headers: Mapping[str, str] | None


@dataclass
class _Stream:
    spec: StreamSpec
    messages: dict[int, Envelope] = field(default_factory=dict)
    """By stream sequence, in order; a work-queue stream forgets what was acked."""
    last_seq: int = 0
    seen: dict[str, float] = field(default_factory=dict)
    """Nats-Msg-Id -> when it was stored, for the dedupe window."""


@dataclass
class _Consumer:
    stream: _Stream
    spec: ConsumerSpec
    next_seq: int = 1
    """The first stream sequence never delivered."""
    due: dict[int, float] = field(default_factory=dict)
    """Delivered, unacked: sequence -> when it is redelivered (AckWait, or a nak)."""
    deliveries: dict[int, int] = field(default_factory=dict)

    def take(self, batch: int, now: float) -> list[int]:
        """Redeliveries first (oldest sequence first), then new messages, each now ours."""
        taken = sorted(seq for seq, at in self.due.items() if at <= now)[:batch]
        room = min(batch - len(taken), self.spec.max_ack_pending - len(self.due))
        fresh = [seq for seq in self.stream.messages if seq >= self.next_seq][: max(room, 0)]
        if fresh:
            self.next_seq = fresh[-1] + 1
        for seq in taken + fresh:
            self.due[seq] = now + self.spec.ack_wait
            self.deliveries[seq] = self.deliveries.get(seq, 0) + 1
        return taken + fresh

    def ack(self, seq: int) -> None:
        if self.due.pop(seq, None) is not None:
            self.deliveries.pop(seq, None)
            if self.stream.spec.work_queue:
                self.stream.messages.pop(seq, None)

    def state(self, name: str) -> ConsumerState:
        return ConsumerState(
            stream=name,
            durable=self.spec.durable,
            pending=sum(1 for seq in self.stream.messages if seq >= self.next_seq),
            ack_pending=len(self.due),
            redelivered=sum(1 for seq in self.due if self.deliveries[seq] > 1),
        )


class MemoryBroker:
    """What a nats-server holds, shared by every ``MemoryBus`` connected to it."""

    def __init__(self) -> None:
        self.streams: dict[str, _Stream] = {}
        self.consumers: dict[tuple[str, str], _Consumer] = {}
        self.core: list[tuple[str, asyncio.Queue[Envelope]]] = []
        """Core subscriptions (``listen``): pattern and inbox."""
        self.followers: list[tuple[str, asyncio.Queue[Envelope]]] = []
        """Ordered consumers (``subscribe_latest``): pattern and inbox, fed as streams grow."""
        self.buckets: dict[str, dict[str, bytes]] = {}
        self._changed = asyncio.Event()

    def changed(self) -> None:
        """Wake every fetch waiting for a message."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, seconds: float) -> None:
        with suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), max(seconds, 0))

    def ensure(self, subjects: Subjects, ack_wait: float) -> None:
        streams, consumers = topology(subjects, ack_wait)
        for spec in streams:
            self.streams.setdefault(subjects.stream(spec.kind), _Stream(spec))
        for consumer in consumers:
            name = subjects.stream(consumer.stream_kind)
            key = (name, consumer.durable)
            self.consumers.setdefault(key, _Consumer(self.streams[name], consumer))
        self.changed()

    def store(self, subject: str, data: bytes, headers: Mapping[str, str] | None) -> None:
        """Append to the stream that takes ``subject``; a msg id seen within the window is a
        duplicate, dropped as JetStream drops it."""
        stream = next(
            (s for s in self.streams.values() if any(matches(p, subject) for p in s.spec.subjects)),
            None,
        )
        if stream is None:
            raise NoStream(f"no stream takes {subject}")
        now = time.monotonic()
        stream.seen = {i: at for i, at in stream.seen.items() if now - at < DEDUPE_WINDOW_SECONDS}
        msg_id = (headers or {}).get("Nats-Msg-Id")
        if msg_id is not None and msg_id in stream.seen:
            return
        if msg_id is not None:
            stream.seen[msg_id] = now
        stream.last_seq += 1
        received = Envelope(subject, data, headers)
        stream.messages[stream.last_seq] = received
        self._deliver(self.followers, received)
        self.changed()

    def send(self, received: Envelope) -> None:
        """Core NATS: to whoever listens now, stored nowhere."""
        self._deliver(self.core, received)

    def _deliver(self, inboxes: list[tuple[str, asyncio.Queue[Envelope]]], msg: Envelope) -> None:
        for pattern, inbox in inboxes:
            if matches(pattern, msg.subject):
                inbox.put_nowait(msg)


@dataclass(frozen=True)
class _Metadata:
    consumer: str | None


@dataclass(frozen=True)
class _Delivery:
    """A delivered message of a durable consumer (satisfies ``port.Message``)."""

    subject: str
    data: bytes
    headers: Mapping[str, str] | None
    metadata: _Metadata
    broker: MemoryBroker
    consumer: _Consumer
    seq: int

    async def ack(self) -> None:
        self.consumer.ack(self.seq)
        self.broker.changed()  # room under max_ack_pending

    async def nak(self, delay: float | None = None) -> None:
        if self.seq in self.consumer.due:
            self.consumer.due[self.seq] = time.monotonic() + (delay or 0.0)
            self.broker.changed()

    async def in_progress(self) -> None:
        if self.seq in self.consumer.due:
            self.consumer.due[self.seq] = time.monotonic() + self.consumer.spec.ack_wait


@dataclass(frozen=True)
class PullSubscription:
    """A binding to a durable consumer (satisfies ``port.Subscription``)."""

    broker: MemoryBroker
    consumer: _Consumer

    async def fetch(self, batch: int, timeout: float) -> Sequence[Message]:
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            taken = self.consumer.take(batch, now)
            if taken or now >= deadline:
                return [self._delivery(seq) for seq in taken]
            # Woken by a publish, a nak or an ack; or when the next AckWait runs out.
            await self.broker.wait(min([deadline, *self.consumer.due.values()]) - now)

    def _delivery(self, seq: int) -> _Delivery:
        msg = self.consumer.stream.messages[seq]
        metadata = _Metadata(self.consumer.spec.durable)
        return _Delivery(
            msg.subject, msg.data, msg.headers, metadata, self.broker, self.consumer, seq
        )


class MemoryBucket:
    """An object bucket: named blobs, held whole."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    async def put(self, name: str, source: io.BufferedIOBase) -> None:
        self.objects[name] = source.read()

    async def get(self, name: str, into: io.BufferedIOBase) -> None:
        if name not in self.objects:
            raise FileNotFoundError(f"no object {name!r}")
        into.write(self.objects[name])

    async def names(self, prefix: str) -> list[str]:
        return sorted(name for name in self.objects if name.startswith(prefix))

    async def delete(self, name: str) -> None:
        self.objects.pop(name, None)

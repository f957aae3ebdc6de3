"""The bus in memory, for unit tests: one service's connection to a ``MemoryBroker``.

It does what ``NatsBus`` does (the same payload checks, decoding, dead letters and spans, from
``port``) over the broker instead of a nats-server; the contract suite (tests/contract) holds the
two to the same behaviour.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from typing import TypeVar

import msgspec
from opentelemetry.propagate import inject
from opentelemetry.trace import Link, Span

from miles import events, telemetry
from miles.runtime.bus.broker import (
    Envelope,
    MemoryBroker,
    MemoryBucket,
    NoStream,
    PullSubscription,
    matches,
)
from miles.runtime.bus.port import (
    ConsumerState,
    Message,
    Oversized,
    Received,
    Subscription,
    dead_letter_record,
    decode_fetched,
    hold,
    oversized,
    process_span,
)
from miles.runtime.subjects import Subjects

log = logging.getLogger(__name__)
E = TypeVar("E", bound=events.Event)
T = TypeVar("T")


class MemoryBus:
    """One service's connection to a ``MemoryBroker`` (satisfies ``port.Bus``)."""

    def __init__(
        self,
        broker: MemoryBroker,
        run_id: str,
        service: str,
        max_payload: int = 8 * 1024 * 1024,
        ack_wait: float = 6.0,
    ) -> None:
        self.broker = broker
        self.subjects = Subjects(run_id)
        self.run_id = run_id
        self.service = service
        self.max_payload = max_payload
        self.ack_wait = ack_wait
        self.dead_letters = 0
        self.on_dead_letter: Callable[[str], Awaitable[None]] | None = None
        self.bound: list[tuple[str, str]] = []
        self.inboxes: list[tuple[str, asyncio.Queue[Envelope]]] = []
        self.tasks: list[asyncio.Task[None]] = []
        """One per ``listen``: calls the handler for each broadcast, in order, as nats-py does."""

    async def ensure_topology(self) -> None:
        self.broker.ensure(self.subjects, self.ack_wait)

    async def pull(self, stream_kind: str, durable: str) -> Subscription:
        key = (self.subjects.stream(stream_kind), durable)
        while key not in self.broker.consumers:  # until the coordinator made it
            await self.broker.wait(1.0)
        if key not in self.bound:
            self.bound.append(key)
        return PullSubscription(self.broker, self.broker.consumers[key])

    async def fetch(
        self, subscription: Subscription, expected: events.Expected[E], batch: int, timeout: float
    ) -> list[tuple[E, Message]]:
        messages = await subscription.fetch(batch=batch, timeout=timeout)
        return await decode_fetched(self, messages, expected)

    async def publish(self, subject: str, event: events.Event, msg_id: str) -> None:
        payload = events.encode(event)
        headers = {"Nats-Msg-Id": msg_id}
        with telemetry.send_span(subject, msg_id, headers) as span:
            span.set_attribute("messaging.message.body.size", len(payload))
            if detail := oversized(event, payload, self.max_payload):
                await self.dead_letter(subject, payload, "oversized", detail)
                raise Oversized(detail)
            self.broker.store(subject, payload, headers)

    def process(
        self, msg: Message, links: Sequence[Link] = (), start_time: int | None = None
    ) -> AbstractContextManager[Span]:
        return process_span(msg, links, start_time)

    async def hold(self, work: Awaitable[T], messages: Sequence[Message]) -> T:
        return await hold(work, messages, every=self.ack_wait / 3)

    async def dead_letter(self, subject: str, payload: bytes, reason: str, detail: str) -> None:
        self.dead_letters += 1
        log.warning("dead-lettered a message from %s: %s: %s", subject, reason, detail[:200])
        record = dead_letter_record(self, subject, payload, reason, detail)
        try:
            self.broker.store(
                self.subjects.dead(self.service), msgspec.msgpack.encode(record), None
            )
        except NoStream as exc:
            log.error("could not record the dead letter (%s); counting it only", exc)
        if self.on_dead_letter is not None:
            await self.on_dead_letter(reason)

    async def broadcast(self, subject: str, event: events.Event) -> None:
        payload = events.encode(event)
        headers: dict[str, str] = {}
        inject(headers)
        if detail := oversized(event, payload, self.max_payload):
            await self.dead_letter(subject, payload, "oversized", detail)
            raise Oversized(detail)
        self.broker.send(Envelope(subject, payload, headers or None))

    async def listen(
        self, subject: str, expected: type[E], handler: Callable[[E], Awaitable[None]]
    ) -> None:
        inbox: asyncio.Queue[Envelope] = asyncio.Queue()
        self.inboxes.append((subject, inbox))
        self.broker.core.append((subject, inbox))

        async def deliver() -> None:
            while True:
                msg = await inbox.get()
                try:
                    event = events.decode(msg.data, expected, self.run_id)
                except events.BadEvent as exc:
                    await self.dead_letter(msg.subject, msg.data, exc.reason, exc.detail)
                    continue
                await handler(event)

        self.tasks.append(asyncio.create_task(deliver()))

    async def subscribe_latest(self, subject: str) -> AsyncIterator[Received]:
        inbox: asyncio.Queue[Envelope] = asyncio.Queue()
        for stream in self.broker.streams.values():
            last = [m for m in stream.messages.values() if matches(subject, m.subject)][-1:]
            for msg in last:
                inbox.put_nowait(msg)
        self.broker.followers.append((subject, inbox))

        async def follow() -> AsyncIterator[Received]:
            while True:
                yield await inbox.get()

        return follow()

    async def consumer_infos(self) -> list[ConsumerState]:
        return [self.broker.consumers[key].state(key[0]) for key in self.bound]

    async def objects(self, bucket: str) -> MemoryBucket:
        return MemoryBucket(self.broker.buckets.setdefault(bucket, {}))

    async def close(self) -> None:
        """Stop listening (what closing a NATS connection does to its subscriptions)."""
        for subscription in self.inboxes:
            self.broker.core.remove(subscription)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.inboxes.clear()
        self.tasks.clear()

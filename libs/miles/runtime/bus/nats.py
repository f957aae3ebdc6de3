"""NATS JetStream: the topology of a run, publishing with dedupe ids, and pulling typed events.

Every publish waits for JetStream's ack, and carries ``Nats-Msg-Id`` so a retried publish (or a
replayed handler after a crash) is dropped by the server's dedupe window. Every pull decodes and
validates: what fails is dead-lettered with a reason and acked, never redelivered forever.

This is also the one place trace context crosses the bus: ``publish`` runs in a ``send
<subject>`` span and injects its W3C context into the NATS headers; a handler wraps each
message it pulled in ``bus.process(msg)``, a ``process <subject>`` span parented by it.
"""

from __future__ import annotations

import asyncio
import io
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractContextManager, suppress
from typing import TypeVar
from urllib.parse import urlparse

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.object_store import ObjectStore
from opentelemetry.propagate import inject
from opentelemetry.trace import Link, Span

from miles import events, telemetry
from miles.runtime.bus.port import (
    ConsumerState,
    Message,
    ObjectBucket,
    Oversized,
    Received,
    Subscription,
    dead_letter_record,
    decode_fetched,
    hold,
    oversized,
    process_span,
)
from miles.runtime.bus.topology import DEDUPE_WINDOW_SECONDS, topology
from miles.runtime.subjects import Subjects

log = logging.getLogger(__name__)
E = TypeVar("E", bound=events.Event)
T = TypeVar("T")

NATS_AWAY = (
    nats.errors.TimeoutError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
)
"""What a call raises while nats-server restarts; the client reconnects on its own."""

PUBLISH_ACK_SECONDS = 2.0


class Unreachable(RuntimeError):
    """NATS (or Redis) is not there; the message says what to set."""


async def connect_nats(url: str, timeout: float, name: str) -> NATS:
    """Connect, or raise ``Unreachable`` with one line saying what to set.

    nats-py retries the first connection as long as ``max_reconnect_attempts`` allows (forever
    here, so a running service rides out a NATS restart), so a plain TCP probe comes first.
    """
    address = urlparse(url)
    try:
        probe = socket.create_connection((address.hostname, address.port or 4222), timeout)
        probe.close()
        return await nats.connect(
            url,
            name=name,
            connect_timeout=timeout,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
        )
    except (TimeoutError, OSError, nats.errors.NoServersError) as exc:
        raise Unreachable(
            f"cannot reach NATS at {url} ({type(exc).__name__}); start nats-server with "
            "JetStream (`nats-server -js`) and set NATS_URL, or unset it to run an embedded one"
        ) from exc


class NatsBus:
    """One service's view of the run's streams, on JetStream (satisfies ``port.Bus``)."""

    def __init__(
        self, nc: NATS, run_id: str, service: str, max_payload: int, ack_wait: float = 6.0
    ) -> None:
        self.nc = nc
        self.ack_wait = ack_wait
        self.js: JetStreamContext = nc.jetstream(timeout=10)
        self.subjects = Subjects(run_id)
        self.run_id = run_id
        self.service = service
        self.max_payload = max_payload
        self.dead_letters = 0
        self.on_dead_letter: Callable[[str], Awaitable[None]] | None = None
        self.bound: list[tuple[str, str]] = []
        """(stream, durable) of every consumer this process pulls from, for ``consumer_infos``."""

    async def ensure_topology(self) -> None:
        """Create this run's streams and consumers; safe to call any number of times."""
        streams, consumers = topology(self.subjects, self.ack_wait)
        for spec in streams:
            config = StreamConfig(
                name=self.subjects.stream(spec.kind),
                subjects=list(spec.subjects),
                retention=RetentionPolicy.WORK_QUEUE if spec.work_queue else RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                duplicate_window=DEDUPE_WINDOW_SECONDS,
                max_msg_size=self.max_payload,
            )
            try:
                await self.js.stream_info(self.subjects.stream(spec.kind))
            except nats.js.errors.NotFoundError:
                await self.js.add_stream(config)
        for consumer in consumers:
            stream = self.subjects.stream(consumer.stream_kind)
            try:
                await self.js.consumer_info(stream, consumer.durable)
            except nats.js.errors.NotFoundError:
                await self.js.add_consumer(
                    stream,
                    ConsumerConfig(
                        durable_name=consumer.durable,
                        ack_policy=AckPolicy.EXPLICIT,
                        ack_wait=consumer.ack_wait,
                        max_ack_pending=consumer.max_ack_pending,
                        deliver_policy=DeliverPolicy.ALL,
                    ),
                )

    async def pull(self, stream_kind: str, durable: str) -> Subscription:
        """Bind to a durable consumer, waiting (with a log line) until the coordinator made it."""
        stream = self.subjects.stream(stream_kind)
        delay = 0.2
        while True:
            try:
                await self.js.consumer_info(stream, durable)
                subscription = await self.js.pull_subscribe_bind(durable=durable, stream=stream)
                if (stream, durable) not in self.bound:
                    self.bound.append((stream, durable))
                return subscription
            except nats.js.errors.NotFoundError:
                log.info("waiting for the coordinator to create %s/%s", stream, durable)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def publish(self, subject: str, event: events.Event, msg_id: str) -> None:
        """Publish and wait for JetStream's ack; retry with backoff while NATS is away.

        Each attempt waits ``PUBLISH_ACK_SECONDS`` for the ack: a publish lost with a dying
        server is retried soon, and the retry is deduplicated by ``msg_id`` if the first one
        landed after all. An event over ``max_payload`` is dead-lettered and ``Oversized`` raised:
        the caller drops (and acks) the input that produced it instead of crash-looping on it.
        """
        payload = events.encode(event)
        headers = {"Nats-Msg-Id": msg_id}
        with telemetry.send_span(subject, msg_id, headers) as span:  # adds traceparent
            span.set_attribute("messaging.message.body.size", len(payload))
            if detail := oversized(event, payload, self.max_payload):
                await self.dead_letter(subject, payload, "oversized", detail)
                raise Oversized(detail)
            delay = 0.1
            deadline = time.monotonic() + 60
            while True:
                try:
                    await self.js.publish(
                        subject, payload, timeout=PUBLISH_ACK_SECONDS, headers=headers
                    )
                    return
                except NATS_AWAY as exc:
                    if time.monotonic() > deadline:
                        raise
                    log.warning("publish to %s failed (%s); retrying in %.1fs", subject, exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)

    async def fetch(
        self, subscription: Subscription, expected: events.Expected[E], batch: int, timeout: float
    ) -> list[tuple[E, Message]]:
        """Pull up to ``batch`` messages; bad ones are dead-lettered and acked here."""
        try:
            messages = await subscription.fetch(batch=batch, timeout=timeout)
        except (TimeoutError, nats.errors.TimeoutError):  # nats-py raises either
            return []
        except NATS_AWAY as exc:  # NATS restarting: the client reconnects by itself
            log.warning("fetch from NATS failed (%s); waiting for it to come back", exc)
            await asyncio.sleep(timeout)
            return []
        return await decode_fetched(self, messages, expected)

    def process(
        self, msg: Message, links: Sequence[Link] = (), start_time: int | None = None
    ) -> AbstractContextManager[Span]:
        """The ``process <subject>`` span of handling one pulled message, made current."""
        return process_span(msg, links, start_time)

    async def consumer_infos(self) -> list[ConsumerState]:
        """JetStream's view of the consumers this process pulls from (pending, ack-pending,
        redelivered); the ones that cannot be read now (NATS away) are left out."""
        states = []
        for stream, durable in self.bound:
            try:
                info = await self.js.consumer_info(stream, durable, timeout=2)
            except (*NATS_AWAY, nats.js.errors.NotFoundError) as exc:
                log.debug("consumer info of %s/%s unavailable: %s", stream, durable, exc)
                continue
            states.append(
                ConsumerState(
                    stream=info.stream_name,
                    durable=info.name,
                    pending=info.num_pending or 0,
                    ack_pending=info.num_ack_pending or 0,
                    redelivered=info.num_redelivered or 0,
                )
            )
        return states

    async def hold(self, work: Awaitable[T], messages: Sequence[Message]) -> T:
        """``work`` while telling JetStream we still hold ``messages``, every third of AckWait."""
        return await hold(work, messages, every=self.ack_wait / 3)

    async def dead_letter(self, subject: str, payload: bytes, reason: str, detail: str) -> None:
        """Record a rejected input where an operator can find it, then move on.

        The record keeps the head of the payload (never decoded further, never unpickled), small
        enough to fit under ``max_payload`` itself. Failing to record is logged, not raised: a
        dead letter must never turn into a crash loop.
        """
        self.dead_letters += 1
        log.warning("dead-lettered a message from %s: %s: %s", subject, reason, detail[:200])
        record = dead_letter_record(self, subject, payload, reason, detail)
        try:
            await self.js.publish(
                self.subjects.dead(self.service), msgspec.msgpack.encode(record), timeout=10
            )
        except (*NATS_AWAY, nats.js.errors.APIError) as exc:
            log.error("could not record the dead letter (%s); counting it only", exc)
        if self.on_dead_letter is not None:
            await self.on_dead_letter(reason)

    async def broadcast(self, subject: str, event: events.Event) -> None:
        """Fire-and-forget on core NATS (heartbeats, control, operator notices): no stream, no
        ack, nobody need be listening. No span of its own (a heartbeat a second would flood the
        traces), but the current trace context rides along, and the size check holds."""
        payload = events.encode(event)
        headers: dict[str, str] = {}
        inject(headers)
        if detail := oversized(event, payload, self.max_payload):
            await self.dead_letter(subject, payload, "oversized", detail)
            raise Oversized(detail)
        await self.nc.publish(subject, payload, headers=headers or None)

    async def listen(
        self, subject: str, expected: type[E], handler: Callable[[E], Awaitable[None]]
    ) -> None:
        """Call ``handler`` with every decoded ``expected`` broadcast on ``subject`` (wildcards
        allowed); what does not decode is dead-lettered, never handed on."""

        async def on_message(msg: Msg) -> None:
            try:
                event = events.decode(msg.data, expected, self.run_id)
            except events.BadEvent as exc:
                await self.dead_letter(msg.subject, msg.data, exc.reason, exc.detail)
                return
            await handler(event)

        await self.nc.subscribe(subject, cb=on_message)
        await self.nc.flush()  # listening when this returns: the server has the subscription

    async def subscribe_latest(self, subject: str) -> AsyncIterator[Received]:
        """An ordered consumer starting at the last message: every replica sees every update.

        Waits, as ``pull`` does, until the coordinator has created the stream: a service that
        starts in a blink (simulated engines) gets here before the coordinator does.
        """
        delay = 0.2
        while True:
            try:
                subscription = await self.js.subscribe(
                    subject, ordered_consumer=True, deliver_policy=DeliverPolicy.LAST
                )
                return subscription.messages
            except nats.js.errors.NotFoundError:
                log.info("waiting for the coordinator to create the stream of %s", subject)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def objects(self, bucket: str) -> ObjectBucket:
        """A JetStream Object Store bucket, created on first use."""
        try:
            store = await self.js.object_store(bucket)
        except nats.js.errors.BucketNotFoundError:
            store = await self.js.create_object_store(bucket)
        return NatsBucket(store)


class NatsBucket:
    """nats-py's ``get`` without ``writeinto`` concatenates chunks into one growing bytes
    object, which is quadratic in the object size; this always streams into a file."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    async def put(self, name: str, source: io.BufferedIOBase) -> None:
        await self.store.put(name, source)

    async def get(self, name: str, into: io.BufferedIOBase) -> None:
        try:
            await self.store.get(name, writeinto=into)
        except nats.js.errors.ObjectNotFoundError as exc:
            raise FileNotFoundError(f"no object {name!r} in the bucket") from exc

    async def names(self, prefix: str) -> list[str]:
        try:
            infos = await self.store.list(ignore_deletes=True)
        except nats.js.errors.NotFoundError:  # an empty bucket
            return []
        return sorted(info.name for info in infos if info.name.startswith(prefix))

    async def delete(self, name: str) -> None:
        with suppress(nats.js.errors.ObjectNotFoundError):
            await self.store.delete(name)

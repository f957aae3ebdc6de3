"""The bus: a run's streams and broadcasts. ``port`` says what a service may ask of it (``Bus``);
``nats`` is JetStream (production, integration and chaos tests) and ``memory`` its in-memory
twin (over a ``broker`` standing in for nats-server) for unit tests; one contract suite
(tests/contract) runs against both. ``topology`` is the run's streams and consumers."""

from miles.runtime.bus.broker import MemoryBroker
from miles.runtime.bus.memory import MemoryBus
from miles.runtime.bus.nats import NATS_AWAY, NatsBus, Unreachable, connect_nats
from miles.runtime.bus.port import (
    Bus,
    ConsumerState,
    DeadLetter,
    Message,
    ObjectBucket,
    ObjectBuckets,
    Oversized,
    Received,
    Subscription,
    hold,
)
from miles.runtime.bus.topology import ConsumerSpec, StreamSpec, topology

__all__ = [
    "NATS_AWAY",
    "Bus",
    "ConsumerSpec",
    "ConsumerState",
    "DeadLetter",
    "MemoryBroker",
    "MemoryBus",
    "Message",
    "NatsBus",
    "ObjectBucket",
    "ObjectBuckets",
    "Oversized",
    "Received",
    "StreamSpec",
    "Subscription",
    "Unreachable",
    "connect_nats",
    "hold",
    "topology",
]

"""The bus: a run's streams and broadcasts. ``port`` says what a service may ask of it;
``nats`` is JetStream (production, integration and chaos tests) and ``memory`` its in-memory
twin for unit tests; one contract suite (tests/contract) runs against both."""

from miles.runtime.bus.nats import (
    NATS_AWAY,
    Bus,
    ConsumerSpec,
    DeadLetter,
    Oversized,
    StreamSpec,
    Unreachable,
    connect_nats,
    hold,
    topology,
)
from miles.runtime.bus.port import Message

__all__ = [
    "NATS_AWAY",
    "Bus",
    "ConsumerSpec",
    "DeadLetter",
    "Message",
    "Oversized",
    "StreamSpec",
    "Unreachable",
    "connect_nats",
    "hold",
    "topology",
]

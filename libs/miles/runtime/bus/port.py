"""What a service may ask of the bus, as Protocols: the NATS implementation and the in-memory
twin both satisfy them, and the contract suite holds them to the same behaviour."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class Metadata(Protocol):
    @property
    def consumer(self) -> str | None: ...


class Message(Protocol):
    """One delivered message of a durable consumer: acked, nak'ed (redeliver now) or kept
    (``in_progress`` resets its AckWait)."""

    @property
    def subject(self) -> str: ...

    @property
    def data(self) -> bytes: ...

    @property
    def headers(self) -> Mapping[str, str] | None: ...

    @property
    def metadata(self) -> Metadata: ...

    async def ack(self) -> None: ...

    async def nak(self, delay: float | None = None) -> None: ...

    async def in_progress(self) -> None: ...

"""Redis replies, typed. redis-py types every reply as ``bytes | str`` because a client may or
may not decode; miles opens its clients with ``decode_responses=True``, and these helpers give
the readers of the run record ``str`` (decoding, should a client hand them bytes)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

Reply = bytes | str


def text(reply: Reply) -> str:
    return reply.decode() if isinstance(reply, bytes) else reply


def optional_text(reply: Reply | None) -> str | None:
    return None if reply is None else text(reply)


def texts(replies: Iterable[Reply]) -> list[str]:
    return [text(reply) for reply in replies]


def text_map(reply: Mapping[Reply, Reply]) -> dict[str, str]:
    """A hash as ``HGETALL`` returns it."""
    return {text(key): text(value) for key, value in reply.items()}


def counts(reply: Mapping[Reply, Reply]) -> dict[str, int]:
    """A hash of counters (``HINCRBY``)."""
    return {text(key): int(value) for key, value in reply.items()}


def members(reply: Iterable[object]) -> list[str]:
    """A sorted set's members, as ``ZRANGE`` without scores returns them (redis-py types the
    reply as either shape)."""
    return [text(member) for member in reply if isinstance(member, bytes | str)]

"""The launcher's Redis reads ride out an outage instead of ending the run.

Redis can be away in two ways: restarting (connections refused: ``ConnectionError``) or stalled
(SIGSTOP, a host swapping, an fsync on a full disk: the socket times out, ``TimeoutError``,
which redis-py does not derive from ``ConnectionError``). Both are retried, with a logged
backoff, for up to ``infra.outage_tolerance_seconds``; after that ``RedisOutage`` says for how
long, and `miles run` stops with the line that resumes the run (the state in Redis is safe:
nothing is committed while it is away).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

T = TypeVar("T")

UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
"""What a read raises while Redis is restarting or stalled."""


def launcher_client(url: str, timeout: float) -> redis.Redis:
    """A client whose every call gives up after ``timeout``: redis-py's own retries are off, so
    ``Outage`` alone paces them and the supervisor keeps watching its children meanwhile."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


class RedisOutage(Exception):
    """Redis stayed unreachable past the tolerance."""

    def __init__(self, seconds: float, cause: BaseException) -> None:
        super().__init__(
            f"Redis was unreachable for {seconds:.0f} s (infra.outage_tolerance_seconds; "
            f"last error {type(cause).__name__}: {cause})"
        )
        self.seconds = seconds


@dataclass
class Outage:
    """How long Redis has been away, across reads; when to try again."""

    tolerance: float
    clock: Callable[[], float] = time.monotonic
    since: float | None = None
    """When the first failed read of this outage started; None while Redis answers."""
    failures: int = 0
    retry_at: float = 0.0

    def read(
        self,
        read: Callable[[], T],
        log: Callable[[str], None],
        sleep: Callable[[float], None] = time.sleep,
        between: Callable[[], None] = lambda: None,
    ) -> T:
        """``read()`` (which never returns None) until it answers; ``between`` runs while
        waiting (the supervisor revives a dead embedded redis-server there). Raises
        ``RedisOutage`` past the tolerance."""
        while True:
            value = self.attempt(read, log)
            if value is not None:
                return value
            between()
            sleep(max(0.0, self.retry_at - self.clock()))

    def attempt(self, read: Callable[[], T], log: Callable[[str], None]) -> T | None:
        """One try, if one is due: the supervisor's tick must not block on Redis, since it also
        restarts crashed services. None when Redis did not answer (or it is not time yet)."""
        started = self.clock()
        if started < self.retry_at:
            return None
        try:
            value = read()
        except UNREACHABLE as exc:
            self._failed(exc, started, log)
            return None
        if self.since is not None:
            log(f"Redis answers again after {self.clock() - self.since:.0f} s")
        self.since, self.failures, self.retry_at = None, 0, 0.0
        return value

    def _failed(self, exc: BaseException, started: float, log: Callable[[str], None]) -> None:
        now = self.clock()
        self.since = started if self.since is None else self.since
        down = now - self.since
        if down >= self.tolerance:
            raise RedisOutage(down, exc) from exc
        self.failures += 1
        delay = min(0.5 * 2 ** (self.failures - 1), 5.0, self.tolerance - down)
        self.retry_at = now + delay
        log(
            f"Redis unreachable for {down:.0f} s ({type(exc).__name__}); retrying in "
            f"{delay:.1f} s, for up to {self.tolerance:.0f} s"
        )

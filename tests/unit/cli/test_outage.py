"""The launcher rides out a Redis that refuses or times out, up to the tolerance, then says how
long it waited (the launcher once crashed on the first ``TimeoutError``)."""

from __future__ import annotations

import pytest
import redis.exceptions

from miles.cli.outage import Outage, RedisOutage


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class StalledRedis:
    """Times out as a SIGSTOPped redis-server does (each try costs the socket timeout), then
    refuses as a restarting one does, then answers."""

    def __init__(self, time: FakeTime, failures: list[Exception]) -> None:
        self.time = time
        self.failures = failures
        self.tries = 0

    def read(self) -> str:
        self.tries += 1
        if self.failures:
            failure = self.failures.pop(0)
            if isinstance(failure, redis.exceptions.TimeoutError):
                self.time.now += 2.0
            raise failure
        return "view"


def test_a_read_retries_timeouts_and_refusals_with_logged_backoff() -> None:
    time = FakeTime()
    failures: list[Exception] = [
        redis.exceptions.TimeoutError("Timeout reading from socket"),
        redis.exceptions.TimeoutError("Timeout reading from socket"),
        redis.exceptions.ConnectionError("Connection refused"),
    ]
    stalled = StalledRedis(time, failures)
    logged: list[str] = []
    outage = Outage(tolerance=30.0, clock=time.clock)

    assert outage.read(stalled.read, logged.append, sleep=time.sleep) == "view"

    assert stalled.tries == 4
    assert [line.split(";")[1] for line in logged[:3]] == [
        " retrying in 0.5 s, for up to 30 s",
        " retrying in 1.0 s, for up to 30 s",
        " retrying in 2.0 s, for up to 30 s",
    ]
    assert "(TimeoutError)" in logged[0] and "(ConnectionError)" in logged[2]
    assert logged[-1] == "Redis answers again after 8 s"
    assert outage.since is None  # the next outage counts from zero


def test_past_the_tolerance_it_says_how_long_redis_was_away() -> None:
    time = FakeTime()
    stalled = StalledRedis(time, [redis.exceptions.TimeoutError("stalled")] * 100)
    outage = Outage(tolerance=20.0, clock=time.clock)

    with pytest.raises(RedisOutage, match=r"Redis was unreachable for 2\d s") as lost:
        outage.read(stalled.read, lambda line: None, sleep=time.sleep)

    assert 20.0 <= lost.value.seconds < 28.0
    assert isinstance(lost.value.__cause__, redis.exceptions.TimeoutError)


def test_an_attempt_does_not_block_before_the_backoff_is_up() -> None:
    """The supervisor's tick also restarts crashed services: it skips a read not due yet."""
    time = FakeTime()
    stalled = StalledRedis(time, [redis.exceptions.ConnectionError("refused")])
    outage = Outage(tolerance=20.0, clock=time.clock)

    assert outage.attempt(stalled.read, lambda line: None) is None
    assert outage.attempt(stalled.read, lambda line: None) is None  # not due: not tried
    assert stalled.tries == 1
    time.now += 0.5
    assert outage.attempt(stalled.read, lambda line: None) == "view"


def test_other_errors_propagate() -> None:
    def broken() -> str:
        raise redis.exceptions.ResponseError("WRONGTYPE")

    with pytest.raises(redis.exceptions.ResponseError):
        Outage(tolerance=20.0).read(broken, lambda line: None)

"""The launcher's reads ride out a stalled redis-server (SIGSTOP: its socket times out, which
redis-py raises as ``TimeoutError``, not ``ConnectionError``) and answer after SIGCONT."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from miles.cli.outage import Outage, RedisOutage, launcher_client
from miles.runtime import embedded

pytestmark = pytest.mark.integration


def stall(server: embedded.Server, seconds: float) -> threading.Timer:
    os.kill(server.process.pid, signal.SIGSTOP)
    timer = threading.Timer(seconds, os.kill, (server.process.pid, signal.SIGCONT))
    timer.start()
    return timer


def test_a_read_outlasts_a_stall_longer_than_the_socket_timeout(
    redis_server: embedded.Server,
) -> None:
    client = launcher_client(redis_server.url, timeout=0.5)
    client.set("outage:key", "kept")
    logged: list[str] = []
    timer = stall(redis_server, 3.0)
    try:
        value = Outage(tolerance=30.0).read(lambda: client.get("outage:key"), logged.append)
    finally:
        timer.join()
    assert value == "kept"
    assert any("(TimeoutError)" in line for line in logged), logged
    assert logged[-1].startswith("Redis answers again after")


def test_a_stall_past_the_tolerance_ends_in_one_clear_error(
    redis_server: embedded.Server,
) -> None:
    client = launcher_client(redis_server.url, timeout=0.5)
    timer = stall(redis_server, 4.0)
    try:
        with pytest.raises(RedisOutage, match=r"Redis was unreachable for [23] s"):
            Outage(tolerance=2.0).read(lambda: client.get("outage:key"), lambda line: None)
    finally:
        timer.join()
    assert client.ping()

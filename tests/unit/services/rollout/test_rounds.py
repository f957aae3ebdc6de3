"""Rounds in flight: they overlap, the service is busy once while any runs, and a round that
fails fails the loop even while it waits for something else."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest

from services.rollout.rounds import Rounds


class Clock:
    """All ``Rounds`` asks of the service context: ``busy``."""

    def __init__(self) -> None:
        self.spans: list[str] = []
        self.busy_now = False

    @contextlib.contextmanager
    def busy(self, phase: str) -> Iterator[None]:
        self.spans.append(phase)
        self.busy_now = True
        try:
            yield
        finally:
            self.busy_now = False


def rounds_on(clock: Clock) -> Rounds:
    return Rounds(clock)  # type: ignore[arg-type]


async def test_overlapping_rounds_are_one_busy_span_and_settle_once() -> None:
    clock = Clock()
    rounds = rounds_on(clock)
    first, second = asyncio.Event(), asyncio.Event()
    rounds.start(first.wait(), 3)
    rounds.start(second.wait(), 2)
    assert rounds.held == 5 and not rounds.idle and clock.busy_now

    first.set()
    await rounds.next_end()
    assert rounds.held == 2 and clock.busy_now and not rounds.settled()

    second.set()
    await rounds.drain()
    assert rounds.idle and not clock.busy_now and clock.spans == ["rollout"]
    assert rounds.settled() and not rounds.settled()  # once per quiet spell

    rounds.start(asyncio.sleep(0), 1)  # a later round is a busy span of its own
    await rounds.drain()
    assert clock.spans == ["rollout", "rollout"]


async def test_a_failed_round_ends_a_wait_that_would_never_end() -> None:
    rounds = rounds_on(Clock())

    async def failing() -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("engine gone")

    rounds.start(failing(), 1)
    never = asyncio.Event()
    with pytest.raises(RuntimeError, match="engine gone"):
        await asyncio.wait_for(rounds.watching(never.wait()), timeout=5)
    with pytest.raises(RuntimeError, match="engine gone"):
        rounds.check()  # and the loop's next check fails too


async def test_watching_returns_what_it_waited_for() -> None:
    rounds = rounds_on(Clock())
    release = asyncio.Event()
    rounds.start(release.wait(), 1)

    async def answer() -> int:
        await asyncio.sleep(0)
        return 7

    assert await rounds.watching(answer()) == 7
    release.set()
    await rounds.drain()


async def test_cancel_stops_every_round() -> None:
    clock = Clock()
    rounds = rounds_on(clock)
    rounds.start(asyncio.Event().wait(), 2)
    rounds.start(asyncio.Event().wait(), 2)
    await rounds.cancel()
    assert rounds.idle and not clock.busy_now
    rounds.check()  # a cancelled round is no failure

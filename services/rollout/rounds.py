"""The rounds a rollout replica has in flight.

A round is one fetch of tasks generated together (``groups``): shared over the engines,
generated, published, acked. Rounds overlap: tasks that arrive while a round runs start a round
of their own at once, on the engines with least in flight, instead of waiting for the round
before to end (a round lasts as long as its longest response; a task held back for it would
wait that long). Two things still wait for every round in flight to end (``drain``): loading
new weights (an engine never loads under a running generation: SGLang's pause would abort it)
and acting on stragglers (a restart would kill another round's requests).

While any round is in flight the service is busy (``ctx.busy("rollout")``), once, however many
overlap. A round that fails fails the service, as it did when the loop awaited it: at the next
``check``, or at once from a wait that ``watching`` guards (the loop waiting for weights that
need the failed round's groups would otherwise wait forever, holding the tasks it fetched).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

from miles import events
from miles.runtime.bus import Bus, Message, Subscription
from miles.runtime.service import ServiceContext

LINGER_SECONDS = 0.02
MAX_LINGER_SECONDS = 0.25
T = TypeVar("T")


class Rounds:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.running: dict[asyncio.Task[None], int] = {}
        """Each round in flight and the tasks (prompt groups) it holds."""
        self.ended = 0
        """Rounds ended since the last ``settled`` (the fleet's straggler check)."""
        self._busy = contextlib.ExitStack()
        self._errors: list[BaseException] = []
        self._failed = asyncio.Event()

    @property
    def held(self) -> int:
        return sum(self.running.values())

    @property
    def idle(self) -> bool:
        return not self.running

    def start(self, work: Coroutine[Any, Any, None], tasks: int) -> None:
        if self.idle:
            self._busy.enter_context(self.ctx.busy("rollout"))
        round_ = asyncio.ensure_future(work)
        self.running[round_] = tasks
        round_.add_done_callback(self._ended)

    def _ended(self, round_: asyncio.Task[None]) -> None:
        del self.running[round_]
        self.ended += 1
        if not round_.cancelled() and round_.exception() is not None:
            self._errors.append(round_.exception())  # type: ignore[arg-type]
            self._failed.set()
        if self.idle:
            self._busy.close()

    def check(self) -> None:
        """Raise what a round that ended raised."""
        if self._errors:
            raise self._errors[0]

    async def watching(self, work: Awaitable[T]) -> T:
        """``work``'s result, unless a round fails first: then what that round raised."""
        waited = asyncio.ensure_future(work)
        failed = asyncio.ensure_future(self._failed.wait())
        try:
            await asyncio.wait({waited, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            failed.cancel()
            if not waited.done():
                waited.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waited
        self.check()
        return waited.result()

    async def next_end(self) -> None:
        """Until some round ends."""
        if self.running:
            await asyncio.wait(list(self.running), return_when=asyncio.FIRST_COMPLETED)
        self.check()

    async def drain(self) -> None:
        """Until every round in flight has ended."""
        while self.running:
            await asyncio.wait(list(self.running))
        self.check()

    def settled(self) -> bool:
        """True once after rounds ended and none is in flight: time to look at stragglers."""
        if self.idle and self.ended:
            self.ended = 0
            return True
        return False

    async def cancel(self) -> None:
        """Stop every round (the service stops): their tasks are redelivered to a replica."""
        for round_ in list(self.running):
            round_.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self.running, return_exceptions=True)


async def fetch_round(
    bus: Bus, tasks: Subscription, size: int, timeout: float = 1.0
) -> list[tuple[events.Task, Message]]:
    """Up to ``size`` tasks for one round: the first within ``timeout``, then those that keep
    arriving less than ``LINGER_SECONDS`` apart, for at most ``MAX_LINGER_SECONDS``.

    A fetch returns as soon as one task is there, but the coordinator publishes a step's tasks
    as a burst, and a round lasts as long as its slowest group: a task that misses the round
    by a millisecond waits a whole round for the next one.
    """
    batch = await bus.fetch(tasks, events.Task, size, timeout)
    deadline = time.monotonic() + MAX_LINGER_SECONDS
    while batch and len(batch) < size and time.monotonic() < deadline:
        more = await bus.fetch(tasks, events.Task, size - len(batch), LINGER_SECONDS)
        if not more:
            break
        batch += more
    return batch

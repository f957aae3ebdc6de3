"""What every reward call runs under: a bound on calls in flight and a per-call timeout.

A synchronous function runs on a worker thread so it cannot stall the event loop (and with it
the bus's in-progress acks); an async one runs on the loop. Either is abandoned after
``timeout`` seconds: its samples fail with the reason recorded, and the service goes on. A
thread cannot be killed, so a function that never returns keeps its worker; the pool has
``concurrency`` of them and a call that waits for one is timed out like any other.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from miles.events import Sample


@dataclass(frozen=True)
class Failure:
    """A reward that could not be computed for a sample, and why (one line)."""

    error: str


Outcome = float | Failure


class Scorer(Protocol):
    """One reward: a value (or a ``Failure``) for each of ``samples``, in order."""

    @property
    def name(self) -> str: ...

    async def score(self, samples: Sequence[Sample], limits: Limits) -> list[Outcome]: ...


class Limits:
    def __init__(self, concurrency: int, timeout: float) -> None:
        self.timeout = timeout
        self._slots = asyncio.Semaphore(concurrency)
        self._threads = ThreadPoolExecutor(concurrency, thread_name_prefix="miles-reward")

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, awaited if it is async; ``TimeoutError`` past the limit."""
        async with self._slots:
            if inspect.iscoroutinefunction(fn):
                return await asyncio.wait_for(fn(*args, **kwargs), self.timeout)
            loop = asyncio.get_running_loop()
            work = loop.run_in_executor(self._threads, functools.partial(fn, *args, **kwargs))
            value = await asyncio.wait_for(work, self.timeout)
            if inspect.isawaitable(value):  # a sync wrapper that returned a coroutine
                value = await asyncio.wait_for(value, self.timeout)
            return value

    async def wait(self, awaitable: Any) -> Any:
        """An awaitable (a Ray object ref, an HTTP call) under the same bound and timeout."""
        async with self._slots:
            return await asyncio.wait_for(awaitable, self.timeout)

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

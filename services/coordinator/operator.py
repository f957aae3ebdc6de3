"""An operator's commands to a running run (`miles pause`, `resume`, `drain`: ``Control``
events on the run's control subject), recorded in the run record, where the feed reads them
every round and a restarted coordinator finds them.

- pause: dispatch nothing more; what is in flight still trains (the trainer then waits);
- resume: dispatch again, and cancel a drain;
- drain: dispatch only the replacements of filtered groups until every group dispatched so far
  is trained (``Pacing.drain_step``), then stop the run at that committed step, marked
  ``drained``: `miles run --resume` continues it.

``stop`` is every service's own (``runtime.service``).
"""

from __future__ import annotations

import asyncio
import logging

from miles import events
from miles.runtime.bus import Bus
from miles.runtime.run_record import RunStorePort
from services.coordinator.feed import Feed

log = logging.getLogger("miles.coordinator")


OPERATOR_COMMANDS = ("pause", "resume", "drain")


class Commands:
    """Commands as they arrive, queued by the bus's callback and obeyed by the coordinator's
    loop (``apply``, each round): the feed changes in one task only, and a callback does no
    I/O that could outlive the service's shutdown."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[events.Control] = asyncio.Queue()

    async def follow(self, bus: Bus) -> None:
        async def on_control(control: events.Control) -> None:
            if control.command in OPERATOR_COMMANDS:
                self.queue.put_nowait(control)

        await bus.listen(bus.subjects.control(), events.Control, on_control)

    async def apply(self, store: RunStorePort, feed: Feed) -> None:
        while not self.queue.empty():
            await obey(store, feed, self.queue.get_nowait())


async def obey(store: RunStorePort, feed: Feed, control: events.Control) -> None:
    why = f" ({control.reason})" if control.reason else ""
    if control.command == "pause":
        await store.update(paused=1)
        log.info("paused at step %d: dispatching nothing%s", feed.step, why)
    elif control.command == "resume":
        await store.update(paused=0, drain_step=0)
        log.info("resumed at step %d%s", feed.step, why)
    elif control.command == "drain":
        await feed.refresh()  # the cursor is this process's; the counters may have moved
        step = feed.pacing.drain_step(feed.progress, feed.cursor)
        await store.update(drain_step=max(step, 1))
        log.info("draining: the run stops once step %d is committed%s", step, why)
    await feed.refresh()

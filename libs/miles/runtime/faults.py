"""Named kill points, so the chaos tests can SIGKILL a service at an exact moment of its loop.

``MILES_CRASH_AT=<point>[@<n>]`` arms one point: the n-th time (default 1) this process reaches
it, the process sends itself SIGKILL, as the OOM killer or a lost node would. With
``MILES_CRASH_ONCE=<file>``, the first process to crash creates that file and no later process
crashes again, so the supervisor's restart runs clean. Unset, every call is one dict lookup.

Points (each names what the process holds when it dies):

- ``coordinator.dispatched``  a task published, the dataset cursor not yet recorded
- ``rollout.generating``      engines mid-generation, nothing of the fetch published
- ``reward.mid_batch``        one scored group published, its input not yet acked
- ``buffer.holding``          scored groups held unacked, no batch formed yet
- ``buffer.published``        a batch published, its groups not yet acked
- ``trainer.stepped``         optimizer step done, weights not saved, manifest not committed
- ``trainer.committed``       manifest committed, batch not acked, weights not announced
- ``trainer.mid_gc``          one old file deleted, the rest of the collection not yet

``MILES_SLOW_ENGINE=<index>:<seconds>`` slows one engine of each rollout replica down: its
server sleeps that long before every generate (the straggler test's engine).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from pathlib import Path

_hits: Counter[str] = Counter()


def _armed(point: str) -> bool:
    spec = os.environ.get("MILES_CRASH_AT")
    if not spec:
        return False
    name, _, nth = spec.partition("@")
    if name != point:
        return False
    _hits[point] += 1
    if _hits[point] != int(nth or 1):
        return False
    once = os.environ.get("MILES_CRASH_ONCE")
    if once:
        try:
            Path(once).touch(exist_ok=False)  # atomic: one process wins, the rest never crash
        except FileExistsError:
            return False
    return True


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def crash_point(point: str) -> None:
    """SIGKILL this process here, when ``point`` is armed."""
    if _armed(point):
        _die()


def crash_soon(point: str, delay: float = 0.2) -> None:
    """SIGKILL this process ``delay`` seconds from now, while the caller's work is under way."""
    if _armed(point):
        asyncio.get_running_loop().call_later(delay, _die)


def engine_delay(index: int) -> float:
    """Seconds the engine ``index`` should waste per generate call (0 unless injected)."""
    spec = os.environ.get("MILES_SLOW_ENGINE", "")
    slow, _, seconds = spec.partition(":")
    return float(seconds or 0) if spec and int(slow) == index else 0.0

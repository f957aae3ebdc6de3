"""Straggler tracking: an engine far under the fleet's median throughput is drained and restarted.

After each round of work the fleet reports every engine's running totals of tokens generated and
seconds spent; an engine's rate is what it did since the previous report (an engine that did
nothing keeps its last rate). One whose rate stays under ``fraction`` of the median rate of the
engines still working for ``patience`` rounds in a row is a straggler: it is drained (gets no
work) and restarted, and once it used ``max_restarts`` restarts it stays drained. A median
needs two rates: an engine alone is never a straggler.

Pure: the fleet acts on the verdicts (``fleet.EngineFleet.check_stragglers``).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from miles import events
from miles.engine.generation import EngineHandle

StragglerAction = Literal["drained and restarted", "stays drained"]


@dataclass(frozen=True)
class Throughput:
    """An engine's running totals: tokens generated and seconds spent generating them."""

    tokens: int = 0
    seconds: float = 0.0


@dataclass
class EnginePace:
    """One engine as the tracker knows it."""

    drained: bool = False
    slow_rounds: int = 0
    restarts: int = 0
    rate: float | None = None
    """Tokens/s over the last round it worked; ``None`` before it worked, or since drained."""
    counted: Throughput = field(default_factory=Throughput)
    """The totals at the previous report."""


@dataclass(frozen=True)
class Straggler:
    """A verdict: engine ``index`` ran at ``rate`` tokens/s against the fleet's ``median``."""

    index: int
    rate: float
    median: float
    restart: bool
    """Restart it (and let it work again); else it has used its restarts and stays drained."""

    @property
    def action(self) -> StragglerAction:
        return "drained and restarted" if self.restart else "stays drained"


class StragglerTracker:
    def __init__(self, engines: int, fraction: float, patience: int, max_restarts: int) -> None:
        self.paces = [EnginePace() for _ in range(engines)]
        self.fraction = fraction
        self.patience = patience
        self.max_restarts = max_restarts

    def drained(self, index: int) -> bool:
        return self.paces[index].drained

    def after_round(self, totals: Sequence[Throughput]) -> list[Straggler]:
        """Update the rates from each engine's ``totals``; drain and return the stragglers."""
        for pace, total in zip(self.paces, totals, strict=True):
            done = Throughput(
                total.tokens - pace.counted.tokens, total.seconds - pace.counted.seconds
            )
            pace.counted = total
            if done.tokens > 0 and done.seconds > 0:
                pace.rate = done.tokens / done.seconds
        rates = [p.rate for p in self.paces if not p.drained and p.rate is not None]
        if len(rates) < 2:
            return []
        median = statistics.median(rates)
        found = []
        for index, pace in enumerate(self.paces):
            if pace.drained or pace.rate is None:
                continue
            slow = pace.rate < self.fraction * median
            pace.slow_rounds = pace.slow_rounds + 1 if slow else 0
            if pace.slow_rounds >= self.patience:
                found.append(self._drain(index, median))
        return found

    def _drain(self, index: int, median: float) -> Straggler:
        pace = self.paces[index]
        straggler = Straggler(index, pace.rate or 0.0, median, pace.restarts < self.max_restarts)
        pace.drained, pace.slow_rounds, pace.rate = True, 0, None
        if straggler.restart:
            pace.restarts += 1
        return straggler

    def restarted(self, index: int) -> None:
        """Engine ``index`` is back after its restart: it gets work again."""
        self.paces[index].drained = False


def engine_flagged(
    run_id: str, engine: EngineHandle, rate: float, median: float, action: StragglerAction
) -> events.EngineFlagged:
    """A straggler, for operators (on ``subjects.engines``)."""
    return events.EngineFlagged(
        run_id=run_id,
        policy_version=engine.weight_version,
        engine=engine.name,
        tokens_per_second=rate,
        fleet_median=median,
        action=action,
    )

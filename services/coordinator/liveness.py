"""Which service instances are alive, from the times of their heartbeats, and how many restarts
of each service are new (pure: times and counts in, changes out; ``watch.py`` does the I/O).

An instance is alive while its heartbeats keep coming; after ``missed`` periods of silence it is
presumed dead and said so once (a restarted service joins as a new instance).
Restarts are counted by `miles run`'s supervisor in the run record; the coordinator exports them
as ``miles_restarts_total{restarted_service}``. The counts only grow, so a restarted coordinator
exporting them from scratch reads as no new restarts to Prometheus' ``increase``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Silence:
    instance: str
    seconds: float


@dataclass
class Liveness:
    timeout: float
    """Seconds without a heartbeat after which an instance is presumed dead."""
    last_seen: dict[str, float] = field(default_factory=dict)
    silent: set[str] = field(default_factory=set)

    @classmethod
    def for_period(cls, heartbeat_seconds: float, missed: int = 3) -> Liveness:
        return cls(timeout=missed * heartbeat_seconds)

    def beat(self, instance: str, now: float) -> bool:
        """A heartbeat of ``instance`` at ``now``; True when it is new or back from silence."""
        back = instance not in self.last_seen or instance in self.silent
        self.silent.discard(instance)
        self.last_seen[instance] = now
        return back

    def check(self, now: float) -> list[Silence]:
        """The instances that went silent since the last check, each reported once."""
        gone = [
            Silence(instance, now - seen)
            for instance, seen in self.last_seen.items()
            if instance not in self.silent and now - seen > self.timeout
        ]
        self.silent.update(silence.instance for silence in gone)
        return gone

    @property
    def alive(self) -> list[str]:
        return sorted(set(self.last_seen) - self.silent)


@dataclass
class Restarts:
    """The restart counts exported so far, and when the run record was last read."""

    period: float
    """Seconds between reads of the run record's counts."""
    exported: dict[str, int] = field(default_factory=dict)
    read_at: float = 0.0

    def due(self, now: float) -> bool:
        """Time to read the counts again; a True answer counts as the read."""
        if now - self.read_at <= self.period:
            return False
        self.read_at = now
        return True

    def new(self, counts: dict[str, int]) -> dict[str, int]:
        """Restarts per service in ``counts`` not exported yet (they are now)."""
        fresh = {s: n - self.exported.get(s, 0) for s, n in counts.items()}
        fresh = {s: n for s, n in fresh.items() if n > 0}
        self.exported.update({s: counts[s] for s in fresh})
        return fresh

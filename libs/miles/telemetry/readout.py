"""Reading the services' metrics back from their heartbeats: one source for `miles status`,
the live view, ``summary.json`` and `miles report`.

Every heartbeat carries a snapshot of the values its process exports on ``/metrics`` (see
``Metrics.snapshot``), so what a person reads in the terminal is what Prometheus scrapes.
Counters are summed over every instance a service ever had (a restarted process starts from
zero, its predecessor's last snapshot stays in Redis); gauges are read from each service's
current instances only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from statistics import fmean
from typing import Any

from miles.telemetry.metrics import parse_series_key

CURRENT_SECONDS = 10.0
"""Instances whose last heartbeat is this close to their service's newest one are current."""


@dataclass(frozen=True)
class Series:
    service: str
    instance: str
    name: str
    labels: dict[str, str]
    value: float
    current: bool


class Readout:
    """The metric series of every instance's last heartbeat."""

    def __init__(self, beats: Iterable[Mapping[str, Any]]) -> None:
        beats = list(beats)
        newest: dict[str, float] = {}
        for beat in beats:
            newest[beat["service"]] = max(newest.get(beat["service"], 0.0), beat["time"])
        self.series: list[Series] = []
        for beat in beats:
            current = beat["time"] >= newest[beat["service"]] - CURRENT_SECONDS
            for key, value in beat.get("metrics", {}).items():
                name, labels = parse_series_key(key)
                self.series.append(
                    Series(beat["service"], beat["instance"], name, labels, value, current)
                )

    def values(self, name: str, labels: Mapping[str, str], current: bool = False) -> list[float]:
        """Every instance's value of the series ``name`` whose labels include ``labels``."""
        return [
            s.value
            for s in self.series
            if s.name == name
            and (not current or s.current)
            and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def total(self, name: str, **labels: str) -> float:
        """A counter over every instance, restarted ones included."""
        return sum(self.values(name, labels))

    def gauge(self, name: str, **labels: str) -> float | None:
        """A gauge's mean over the current instances that export it; None if none does."""
        found = self.values(name, labels, current=True)
        return fmean(found) if found else None

    def highest(self, name: str, current: bool = False, **labels: str) -> float | None:
        found = self.values(name, labels, current)
        return max(found) if found else None

    def label_values(self, name: str, label: str) -> list[str]:
        return sorted(
            {s.labels[label] for s in self.series if s.name == name and label in s.labels}
        )

    def ratio(self, numerator: str, denominator: str, **labels: str) -> float | None:
        below = self.total(denominator, **labels)
        return self.total(numerator, **labels) / below if below else None

    def key_metrics(self) -> dict[str, Any]:
        """What `miles status`, the live view and ``summary.json`` show, named like the
        metrics they come from."""
        consumers = self.label_values("miles_consumer_pending_messages", "consumer")
        return {
            "policy_version": self.highest("miles_policy_version", current=True),
            "samples_generated": self.total("miles_samples_generated_total"),
            "tokens_generated": self.total("miles_tokens_generated_total"),
            "samples_scored": self.total("miles_samples_scored_total"),
            "reward_mean": self.ratio("miles_reward_running_sum", "miles_reward_count"),
            "reward_mean_by_fn": {
                fn: self.ratio("miles_reward_running_sum", "miles_reward_count", reward_fn=fn)
                for fn in self.label_values("miles_reward_count", "reward_fn")
            },
            "bleed_ratio": {
                side: self.gauge("miles_bleed_ratio", side=side)
                for side in ("trainer_waiting_for_data", "rollout_waiting_for_weights")
            },
            "phase_seconds": {
                phase: round(self.total("miles_phase_seconds_total", phase=phase), 3)
                for phase in self.label_values("miles_phase_seconds_total", "phase")
            },
            "phase_cpu_seconds": {
                phase: round(self.total("miles_phase_cpu_seconds_total", phase=phase), 3)
                for phase in self.label_values("miles_phase_cpu_seconds_total", "phase")
            },
            "step_seconds_mean": self.ratio(
                "miles_step_duration_seconds_sum", "miles_step_duration_seconds_count"
            ),
            "staleness_mean": self.ratio(
                "miles_sample_staleness_sum", "miles_sample_staleness_count"
            ),
            "buffer_depth": self.gauge("miles_buffer_depth"),
            "consumer_pending": {
                c: self.highest("miles_consumer_pending_messages", True, consumer=c)
                for c in consumers
            },
            "consumer_ack_pending": {
                c: self.highest("miles_consumer_ack_pending_messages", True, consumer=c)
                for c in consumers
            },
            "consumer_redelivered": {
                c: self.highest("miles_consumer_redelivered_messages", True, consumer=c)
                for c in consumers
            },
            "dead_letters": self.total("miles_dead_letters_total"),
            "groups_filtered": self.total("miles_groups_filtered_total"),
            # the coordinator exports the supervisor's running totals: the highest is the count
            "restarts": {
                service: self.highest("miles_restarts_total", restarted_service=service)
                for service in self.label_values("miles_restarts_total", "restarted_service")
            },
        }

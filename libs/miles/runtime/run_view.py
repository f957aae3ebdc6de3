"""Where a run stands, read from its Redis record: one source for `miles status`, the live view,
``summary.json`` and `miles report`. The metric values come from the services' heartbeats,
which carry what each one exports on ``/metrics`` (``miles.telemetry.readout``)."""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import redis

from miles.events import Heartbeat
from miles.runtime.checkpoint import Manifest
from miles.runtime.replies import counts, optional_text, text, text_map
from miles.runtime.run_record import EvalResult, RunRecord
from miles.runtime.store import RunKeys
from miles.telemetry.readout import Readout


@dataclass
class RunView:
    """One read of a run's record, every part decoded into its struct."""

    exists: bool
    """False for a run id Redis holds no record of (``record`` then has its defaults)."""
    record: RunRecord
    config: dict[str, Any]
    steps: list[Manifest]
    evals: list[EvalResult]
    services: dict[str, Heartbeat]
    dead_letters: dict[str, int]
    filtered: dict[str, int]

    @classmethod
    def read(cls, client: redis.Redis, run_id: str) -> RunView:
        keys = RunKeys(run_id)
        record = text_map(client.hgetall(keys.record))
        latest = int(optional_text(client.get(keys.latest)) or 0)
        manifests = client.mget([keys.manifest(s) for s in range(1, latest + 1)]) if latest else []
        beats = client.hgetall(keys.services)
        return cls(
            exists=bool(record),
            record=RunRecord.decode(record),
            config=json.loads(optional_text(client.get(keys.config)) or "{}"),
            steps=[_MANIFEST.decode(row) for row in manifests if row is not None],
            evals=[_EVAL.decode(row) for row in client.lrange(keys.evals, 0, -1)],
            services={text(name): _HEARTBEAT.decode(beat) for name, beat in beats.items()},
            dead_letters=counts(client.hgetall(keys.dead)),
            filtered=counts(client.hgetall(keys.filtered)),
        )

    @functools.cached_property
    def metrics(self) -> Readout:
        return Readout(msgspec.to_builtins(beat) for beat in self.services.values())

    @property
    def step(self) -> int:
        return self.record.step

    def wall_seconds(self) -> float:
        end = self.record.finished or time.time()
        return end - (end if self.record.started is None else self.record.started)

    def samples_per_second(self) -> float:
        trained = sum(step.samples for step in self.steps)
        wall = self.wall_seconds()
        return trained / wall if wall > 0 else 0.0

    def accuracy(self) -> float | None:
        return self.evals[-1].accuracy if self.evals else None

    def service_seconds(self) -> dict[str, dict[str, float]]:
        """Busy and waiting seconds summed over each service's instances."""
        out: dict[str, dict[str, float]] = {}
        for beat in self.services.values():
            entry = out.setdefault(beat.service, {"busy": 0.0, "waiting": 0.0, "instances": 0})
            entry["busy"] += beat.busy_seconds
            entry["waiting"] += beat.wait_seconds
            entry["instances"] += 1
        for entry in out.values():
            total = entry["busy"] + entry["waiting"]
            entry["waiting_share"] = entry["waiting"] / total if total else 0.0
        return out

    def live_services(self, within: float = 10.0) -> list[str]:
        now = time.time()
        return sorted(k for k, b in self.services.items() if now - b.time < within)

    def headline(self) -> dict[str, str]:
        """The metric rows `miles status` prints and the live view shows, formatted once."""
        key = self.metrics.key_metrics()
        bleed = key["bleed_ratio"]
        phases = sorted(key["phase_seconds"].items(), key=lambda item: -item[1])
        return {
            "reward mean (scored so far)": _fmt(key["reward_mean"], "{:.3f}"),
            "bleed: trainer waiting for data": _fmt(bleed["trainer_waiting_for_data"], "{:.0%}"),
            "bleed: rollout waiting for weights": _fmt(
                bleed["rollout_waiting_for_weights"], "{:.0%}"
            ),
            "samples / tokens generated": f"{key['samples_generated']:.0f} / "
            f"{key['tokens_generated']:.0f}",
            "seconds per phase": ", ".join(f"{k} {v:.1f}" for k, v in phases) or "-",
            "staleness (mean versions)": _fmt(key["staleness_mean"], "{:.2f}"),
            "buffer depth (groups)": _fmt(key["buffer_depth"], "{:.0f}"),
            "consumers pending / ack pending": ", ".join(
                f"{c} {_fmt(key['consumer_pending'][c], '{:.0f}')}"
                f"/{_fmt(key['consumer_ack_pending'][c], '{:.0f}')}"
                for c in key["consumer_pending"]
            )
            or "-",
            "restarts": ", ".join(f"{k} {v:.0f}" for k, v in key["restarts"].items() if v)
            or "none",
        }

    def summary(self) -> dict[str, Any]:
        rewards = [step.reward_mean for step in self.steps]
        phase: dict[str, float] = {}
        for step in self.steps:
            for name, seconds in step.seconds.items():
                phase[name] = phase.get(name, 0.0) + seconds
        return {
            "run_id": self.record.run_id,
            "status": self.record.status,
            "steps": self.step,
            "wall_seconds": round(self.wall_seconds(), 2),
            "samples_per_second": round(self.samples_per_second(), 3),
            "accuracy_before": self.evals[0].accuracy if self.evals else None,
            "accuracy_after": self.evals[-1].accuracy if self.evals else None,
            "evals": [{"after_step": e.after_step, "accuracy": e.accuracy} for e in self.evals],
            "reward_mean_first": rewards[0] if rewards else None,
            "reward_mean_last": rewards[-1] if rewards else None,
            "reward_mean_by_step": rewards,
            "trainer_seconds_by_phase": {k: round(v, 3) for k, v in phase.items()},
            "services": self.service_seconds(),
            "filtered_groups": self.filtered,
            "dead_letters": self.dead_letters,
            "metrics": self.metrics.key_metrics(),
        }


_MANIFEST = msgspec.json.Decoder(Manifest)
_EVAL = msgspec.json.Decoder(EvalResult)
_HEARTBEAT = msgspec.json.Decoder(Heartbeat)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)

"""Feeding the experiment trackers from the run record, and `miles track RUN`.

`miles run` does it while it supervises; `miles track` does the same for a run whose services
were started another way (`miles serve`, Kubernetes): it follows the run in Redis until it
finishes. Per committed step the trackers get what ``steps.jsonl`` holds (the manifest's
reward, metrics and seconds); per evaluation the held-out accuracy and a table of completions.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from miles.config import MilesConfig, TrackingConfig
from miles.runtime.checkpoint import Manifest
from miles.runtime.run_record import EvalResult
from miles.runtime.run_view import RunView
from miles.telemetry.trackers import Tracker, open_trackers

log = logging.getLogger("miles.track")

COMPLETION_COLUMNS = ("prompt", "completion", "label", "reward")


def step_values(manifest: Manifest) -> dict[str, float]:
    values = {"train/reward_mean": manifest.reward_mean, "train/samples": float(manifest.samples)}
    values |= {f"train/{name}": value for name, value in manifest.metrics.items()}
    values |= {f"time/{phase}": seconds for phase, seconds in manifest.seconds.items()}
    values |= {f"turns/{role}": float(n) for role, n in manifest.turns.items()}
    return values


def eval_values(result: EvalResult) -> dict[str, float]:
    return {
        "eval/accuracy": result.accuracy,
        "eval/reward_mean": result.reward_mean,
        "eval/n": float(result.n),
    }


@dataclass
class Follower:
    """Logs each step and evaluation once, in the order the run record holds them."""

    trackers: list[Tracker]
    completions: int
    steps_logged: int = 0
    evals_logged: int = 0
    failed: set[int] = field(default_factory=set)

    def update(self, view: RunView) -> None:
        for manifest in view.steps[self.steps_logged :]:
            values = step_values(manifest)
            self._each(functools.partial(_log, step=manifest.step, values=values))
            self.steps_logged += 1
        for result in view.evals[self.evals_logged :]:
            step = result.after_step
            self._each(functools.partial(_log, step=step, values=eval_values(result)))
            examples = result.examples[: self.completions]
            rows = [[e.prompt, e.completion, e.label, e.reward] for e in examples]
            if rows:
                self._each(functools.partial(_table, step=step, rows=rows))
            self.evals_logged += 1

    def _each(self, call: Callable[[Tracker], None]) -> None:
        """A tracker that fails (a wandb outage) is logged and dropped: never the run."""
        for index, tracker in enumerate(self.trackers):
            if index in self.failed:
                continue
            try:
                call(tracker)
            except Exception:  # a tracker's failure must not end the run
                log.exception("%s failed; it gets nothing more", type(tracker).__name__)
                self.failed.add(index)

    def close(self) -> None:
        for tracker in self.trackers:
            with contextlib.suppress(Exception):
                tracker.close()


def _log(tracker: Tracker, step: int, values: dict[str, float]) -> None:
    tracker.log(step, values)


def _table(tracker: Tracker, step: int, rows: list[list[Any]]) -> None:
    tracker.table(step, "eval/completions", COMPLETION_COLUMNS, rows)


def follower(
    tracking: TrackingConfig, run_id: str, run_dir: Path, config: MilesConfig
) -> Follower | None:
    # Not the infra URLs: they carry passwords (the embedded servers', or a service's own).
    public = config.model_dump(mode="json", exclude={"infra": {"nats_url", "redis_url"}})
    trackers = open_trackers(tracking, run_id, run_dir, public)
    return Follower(trackers, tracking.completions) if trackers else None


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    track = sub.add_parser(
        "track",
        help="follow a run in Redis and log it to wandb / TensorBoard",
        description="What `miles run` does with tracking.wandb / tracking.tensorboard, for a "
        "run started another way (`miles serve`, Kubernetes): follows it until it finishes.",
    )
    track.add_argument("run_id", help="the run to follow")
    track.add_argument("--wandb", action="store_true", help="log to Weights & Biases")
    track.add_argument("--tensorboard", action="store_true", help="write TensorBoard events")
    track.add_argument("--output-dir", type=Path, default=Path("runs"), help="runs/ directory")


def run(args: argparse.Namespace) -> int:
    url = os.environ.get("REDIS_URL")
    if not url:
        raise FileNotFoundError("miles track needs REDIS_URL: the run record is read from Redis")
    client = redis.Redis.from_url(url, decode_responses=True)
    view = RunView.read(client, args.run_id)
    if not view.exists:
        raise FileNotFoundError(f"Redis at {url} holds no run {args.run_id}")
    config = MilesConfig.model_validate(view.config) if view.config else MilesConfig()
    tracking = config.tracking.model_copy(
        update={
            "wandb": args.wandb or config.tracking.wandb,
            "tensorboard": args.tensorboard or config.tracking.tensorboard,
        }
    )
    following = follower(tracking, args.run_id, args.output_dir / args.run_id, config)
    if following is None:
        raise FileNotFoundError("nothing to track to: pass --wandb and/or --tensorboard")
    try:
        while True:
            view = RunView.read(client, args.run_id)
            following.update(view)
            if view.record.status == "finished":
                return 0
            time.sleep(2.0)
    finally:
        following.close()

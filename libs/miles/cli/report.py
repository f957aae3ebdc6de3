"""`miles report <run>`: a run as pictures and a page, for a person to look at rather than read.

Where the run comes from: its Redis record when a reachable Redis holds it (a run still going,
or one on a cluster), else the files `miles run` leaves in ``runs/<run_id>/`` when it ends
(its embedded Redis is gone by then):

- ``summary.json``  the run summary (accuracy, wall time, waiting shares, key metrics)
- ``steps.jsonl``   one committed step per line: its manifest without the id lists and RNG
- ``metrics.json``  every service instance's last heartbeat, with its metric snapshot
- ``timeline.jsonl`` the key metrics every 2 s while the run went (bleed over time)

What it writes, into ``runs/<run_id>/report/`` (or ``--out``): ``reward.png`` (mean reward and
the reward distribution per step), ``accuracy.png`` (held-out accuracy), ``time.png`` (the
trainer's seconds per step by phase, and every service's seconds and CPU per phase),
``bleed.png`` (time waiting over wall time) and ``report.md`` linking them.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import redis

from miles.events import Heartbeat
from miles.runtime.checkpoint import Manifest
from miles.runtime.run_view import RunView
from miles.telemetry.readout import Readout

log = logging.getLogger(__name__)
STEP_FIELDS_DROPPED = ("sample_ids", "rng_state")
"""Manifest fields ``steps.jsonl`` leaves out: long, and no plot needs them."""


class StepRecord(msgspec.Struct, kw_only=True):
    """One committed step as the plots read it: from its manifest, or a line of ``steps.jsonl``
    (the manifest without ``STEP_FIELDS_DROPPED``)."""

    step: int
    time: float
    reward_mean: float
    seconds: dict[str, float]
    reward_histogram: dict[str, int] = {}

    @classmethod
    def of(cls, manifest: Manifest) -> StepRecord:
        return cls(
            step=manifest.step,
            time=manifest.time,
            reward_mean=manifest.reward_mean,
            seconds=manifest.seconds,
            reward_histogram=manifest.reward_histogram,
        )


@dataclass
class RunData:
    run_id: str
    summary: dict[str, Any]
    steps: list[StepRecord]
    beats: list[Heartbeat]
    timeline: list[dict[str, Any]]

    @classmethod
    def from_view(cls, view: RunView, timeline: list[dict[str, Any]]) -> RunData:
        return cls(
            view.record.run_id,
            view.summary(),
            [StepRecord.of(manifest) for manifest in view.steps],
            list(view.services.values()),
            timeline,
        )

    @classmethod
    def from_dir(cls, run_dir: Path) -> RunData:
        summary_path = run_dir / "summary.json"
        if not summary_path.exists():
            raise FileNotFoundError(
                f"{run_dir} has no summary.json (written when `miles run` ends); for a run "
                "still going, point --redis-url (or REDIS_URL) at its Redis"
            )
        steps_path, beats_path = run_dir / "steps.jsonl", run_dir / "metrics.json"
        lines = steps_path.read_bytes().splitlines()
        steps = [msgspec.json.decode(line, type=StepRecord) for line in lines if line]
        beats = _BEATS.decode(beats_path.read_bytes()) if beats_path.exists() else []
        summary = json.loads(summary_path.read_text())
        return cls(run_dir.name, summary, steps, beats, _timeline(run_dir))

    @property
    def metrics(self) -> Readout:
        return Readout(msgspec.to_builtins(beat) for beat in self.beats)


_BEATS = msgspec.json.Decoder(list[Heartbeat])


def load(run: str, redis_url: str | None, output_dir: Path) -> tuple[RunData, Path]:
    """The run (an id under ``output_dir``, or a run directory) and its directory: from Redis
    when ``redis_url`` reaches one that holds it, else from the run's files."""
    given = Path(run)
    run_dir = given if given.is_dir() else output_dir / run
    if redis_url:
        client = redis.Redis.from_url(redis_url, decode_responses=True, socket_connect_timeout=3)
        try:
            view = RunView.read(client, run_dir.name)
            if view.exists:
                return RunData.from_view(view, _timeline(run_dir)), run_dir
        except redis.exceptions.ConnectionError as exc:
            log.info("Redis at %s unreachable (%s): reading %s", redis_url, exc, run_dir)
        finally:
            client.close()
    return RunData.from_dir(run_dir), run_dir


def save_run(run_dir: Path, view: RunView) -> None:
    """Write ``steps.jsonl`` and ``metrics.json`` (`miles run` calls this at the end)."""
    lines = [json.dumps(_step_record(manifest)) for manifest in view.steps]
    (run_dir / "steps.jsonl").write_text("".join(line + "\n" for line in lines))
    beats = sorted(view.services.values(), key=lambda beat: (beat.service, beat.time))
    (run_dir / "metrics.json").write_text(json.dumps(msgspec.to_builtins(beats), indent=1))


def append_timeline(path: Path, view: RunView) -> None:
    """One line of ``timeline.jsonl``: where the run stands now (`miles run` calls it)."""
    key = view.metrics.key_metrics()
    point = {"time": time.time(), "step": view.step} | {
        name: key[name] for name in ("bleed_ratio", "phase_seconds", "samples_generated")
    }
    with path.open("a") as handle:
        handle.write(json.dumps(point) + "\n")


def _timeline(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "timeline.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _step_record(manifest: Manifest) -> dict[str, Any]:
    fields: dict[str, Any] = msgspec.to_builtins(manifest)
    return {k: v for k, v in fields.items() if k not in STEP_FIELDS_DROPPED}


# --- the pictures ---------------------------------------------------------------------------


def write_report(data: RunData, out: Path) -> list[Path]:
    """Every plot and ``report.md`` into ``out``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    out.mkdir(parents=True, exist_ok=True)
    written = [
        _plot_reward(data, out / "reward.png"),
        _plot_accuracy(data, out / "accuracy.png"),
        _plot_time(data, out / "time.png"),
        _plot_bleed(data, out / "bleed.png"),
    ]
    page = out / "report.md"
    page.write_text(markdown(data, [path.name for path in written]))
    return [*written, page]


def _figure(rows: int = 1, columns: int = 1, size: tuple[float, float] = (9, 4)) -> Any:
    import matplotlib.pyplot as plt

    return plt.subplots(rows, columns, figsize=size, constrained_layout=True, squeeze=False)


def _save(figure: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _plot_reward(data: RunData, path: Path) -> Path:
    figure, axes = _figure(2, 1, (9, 6.5))
    mean_axis, share_axis = axes[0][0], axes[1][0]
    steps = [step.step for step in data.steps]
    mean_axis.plot(steps, [step.reward_mean for step in data.steps], marker="o", ms=3)
    mean_axis.set(title="reward mean per step (trained samples)", xlabel="step", ylabel="reward")
    mean_axis.grid(alpha=0.3)
    _integer_ticks(mean_axis)

    buckets = _reward_buckets(data.steps)
    if buckets:
        import matplotlib.pyplot as plt

        colours = plt.get_cmap("viridis")(
            [i / max(len(buckets) - 1, 1) for i in range(len(buckets))]
        )
        bottom = [0.0] * len(steps)
        for bucket, colour in zip(buckets, colours, strict=True):
            shares = [_share(step, bucket) for step in data.steps]
            share_axis.bar(steps, shares, bottom=bottom, color=colour, label=f"≤ {bucket}")
            bottom = [b + s for b, s in zip(bottom, shares, strict=True)]
        share_axis.legend(title="reward", fontsize=7, ncol=min(len(buckets), 6), loc="lower left")
    share_axis.set(
        title="reward distribution per step (share of samples per bucket)",
        xlabel="step",
        ylabel="share",
        ylim=(0, 1),
    )
    _integer_ticks(share_axis)
    return _save(figure, path)


def _reward_buckets(steps: list[StepRecord]) -> list[str]:
    """The buckets any step used, in order of their upper bound."""
    used = {bucket for step in steps for bucket, n in step.reward_histogram.items() if n}
    return sorted(used, key=lambda bucket: math.inf if bucket == "+Inf" else float(bucket))


def _share(step: StepRecord, bucket: str) -> float:
    counts = step.reward_histogram
    total = sum(counts.values())
    return counts.get(bucket, 0) / total if total else 0.0


def _plot_accuracy(data: RunData, path: Path) -> Path:
    figure, axes = _figure()
    axis = axes[0][0]
    evals = data.summary.get("evals", [])
    axis.plot([e["after_step"] for e in evals], [e["accuracy"] for e in evals], marker="o")
    axis.set(title="held-out greedy accuracy", xlabel="after step", ylabel="accuracy", ylim=(0, 1))
    axis.grid(alpha=0.3)
    return _save(figure, path)


def _plot_time(data: RunData, path: Path) -> Path:
    figure, axes = _figure(1, 2, (12, 4.5))
    per_step, per_phase = axes[0][0], axes[0][1]
    steps = [step.step for step in data.steps]
    phases = sorted({name for step in data.steps for name in step.seconds})
    bottom = [0.0] * len(steps)
    for phase in phases:
        seconds = [step.seconds.get(phase, 0.0) for step in data.steps]
        per_step.bar(steps, seconds, bottom=bottom, label=phase)
        bottom = [b + s for b, s in zip(bottom, seconds, strict=True)]
    per_step.set(title="trainer seconds per step", xlabel="step", ylabel="seconds")
    _integer_ticks(per_step)
    if phases:
        per_step.legend(fontsize=8)

    key = data.metrics.key_metrics()
    wall, cpu = key["phase_seconds"], key["phase_cpu_seconds"]
    names = sorted(wall, key=lambda name: wall[name])
    per_phase.barh(names, [wall[n] for n in names], label="wall seconds")
    per_phase.barh(names, [cpu.get(n, 0.0) for n in names], height=0.4, label="CPU seconds")
    per_phase.set(title="seconds per phase, all services (miles_phase_*)", xlabel="seconds")
    if names:
        per_phase.legend(fontsize=8)
    return _save(figure, path)


def trainer_bleed_by_step(steps: list[StepRecord]) -> list[float]:
    """Per step: the trainer's wait for its batch over the step's wall time (commit to commit;
    the first step from its own seconds)."""
    out = []
    previous = None
    for step in steps:
        waited = step.seconds.get("wait_for_batch", 0.0)
        wall = step.time - previous if previous else sum(step.seconds.values())
        out.append(min(max(waited / wall, 0.0), 1.0) if wall > 0 else 0.0)
        previous = step.time
    return out


def _plot_bleed(data: RunData, path: Path) -> Path:
    figure, axes = _figure(1, 3, (15, 4.5))
    over_steps, over_time, shares = axes[0]
    steps = [step.step for step in data.steps]
    over_steps.plot(steps, trainer_bleed_by_step(data.steps), marker="o", ms=3)
    over_steps.set(
        title="trainer waiting for data, per step", xlabel="step", ylabel="ratio", ylim=(0, 1.05)
    )
    _integer_ticks(over_steps)
    if data.timeline:
        start = data.timeline[0]["time"]
        for side in ("trainer_waiting_for_data", "rollout_waiting_for_weights"):
            points = [p for p in data.timeline if p["bleed_ratio"].get(side) is not None]
            over_time.plot(
                [p["time"] - start for p in points],
                [p["bleed_ratio"][side] for p in points],
                label=side,
            )
        over_time.legend(fontsize=8)
    else:
        over_time.text(0.5, 0.5, "no timeline.jsonl", ha="center", transform=over_time.transAxes)
    over_time.set(
        title="miles_bleed_ratio over time", xlabel="seconds", ylabel="ratio", ylim=(0, 1.05)
    )
    services = data.summary.get("services", {})
    names = sorted(services)
    shares.bar(names, [services[n]["waiting_share"] for n in names])
    shares.set(title="share of wall time each service waited for input", ylim=(0, 1))
    return _save(figure, path)


def _integer_ticks(axis: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))


# --- the page -------------------------------------------------------------------------------


def markdown(data: RunData, images: list[str]) -> str:
    summary, key = data.summary, data.metrics.key_metrics()
    bleed = key["bleed_ratio"]
    phases = sorted(key["phase_seconds"].items(), key=lambda item: -item[1])
    rows = {
        "status": summary.get("status"),
        "steps": summary.get("steps"),
        "wall time": f"{summary.get('wall_seconds', 0):.0f} s",
        "samples/s (trained)": summary.get("samples_per_second"),
        "held-out accuracy": f"{_num(summary.get('accuracy_before'))} → "
        f"{_num(summary.get('accuracy_after'))}",
        "reward mean, first → last step": f"{_num(summary.get('reward_mean_first'))} → "
        f"{_num(summary.get('reward_mean_last'))}",
        "bleed: trainer waiting for data (last step)": _pct(bleed["trainer_waiting_for_data"]),
        "bleed: rollout waiting for weights (last version)": _pct(
            bleed["rollout_waiting_for_weights"]
        ),
        "samples / tokens generated": f"{key['samples_generated']:.0f} / "
        f"{key['tokens_generated']:.0f}",
        "seconds per phase": ", ".join(f"{name} {sec:.1f}" for name, sec in phases) or "-",
        "groups filtered": json.dumps(summary.get("filtered_groups", {})),
        "dead letters": json.dumps(summary.get("dead_letters", {})),
        "restarts": json.dumps(summary.get("restarts", key["restarts"])),
    }
    lines = [f"# miles run {data.run_id}", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows.items()]
    lines += [""] + [f"![{Path(image).stem}]({image})" for image in images]
    return "\n".join(lines) + "\n"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    report = sub.add_parser(
        "report",
        help="plots and a markdown summary of a run",
        description="Write PNG plots (reward mean and distribution per step, held-out "
        "accuracy, time per phase, bleed) and report.md. Reads the run from Redis when "
        "--redis-url / REDIS_URL reaches one that holds it, else from the files `miles run` "
        "wrote in runs/<id>/ (summary.json, steps.jsonl, metrics.json).",
    )
    report.add_argument("run", metavar="RUN", help="run id, or a run directory")
    report.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL"), help="default: $REDIS_URL"
    )
    report.add_argument(
        "--output-dir", type=Path, default=Path("runs"), help="where run ids are found"
    )
    report.add_argument("--out", type=Path, help="where to write (default: <run dir>/report)")


def run(args: argparse.Namespace) -> int:
    data, run_dir = load(args.run, args.redis_url, args.output_dir)
    for path in write_report(data, args.out or run_dir / "report"):
        print(path)
    return 0

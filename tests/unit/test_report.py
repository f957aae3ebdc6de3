"""`miles report`: from the files a finished `miles run` leaves, PNG plots a person can look at
and a markdown page that links them."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from contract.record_harness import manifest

from miles import events
from miles.cli import report
from miles.cli.main import main
from miles.runtime.run_record import EvalResult, RunRecord
from miles.runtime.run_view import RunView
from miles.telemetry.record import reward_histogram

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, steps: int = 5) -> None:
    """The files `miles run` writes at the end, for a small made-up run."""
    run_dir.mkdir(parents=True)
    records = []
    for step in range(1, steps + 1):
        rewards = [1.0] * step + [0.0] * (8 - step)
        records.append(
            {
                "step": step,
                "policy_version": step,
                "time": 1000.0 + 2 * step,
                "task_ids": [f"t{step}"],
                "samples": 8,
                "reward_mean": sum(rewards) / 8,
                "reward_histogram": reward_histogram(rewards),
                "metrics": {"loss": -0.01 * step},
                "seconds": {"wait_for_batch": 1.0, "train": 0.5, "save_weights": 0.1},
            }
        )
    (run_dir / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {
        "run_id": run_dir.name,
        "status": "finished",
        "steps": steps,
        "wall_seconds": 12.0,
        "samples_per_second": 3.3,
        "accuracy_before": 0.3,
        "accuracy_after": 0.6,
        "evals": [{"after_step": 0, "accuracy": 0.3}, {"after_step": steps, "accuracy": 0.6}],
        "reward_mean_first": records[0]["reward_mean"],
        "reward_mean_last": records[-1]["reward_mean"],
        "services": {
            name: {"busy": 1.0, "waiting": 3.0, "instances": 1, "waiting_share": 0.75}
            for name in ("coordinator", "rollout", "reward", "buffer", "trainer")
        },
        "filtered_groups": {"zero_variance": 2},
        "dead_letters": {},
        "restarts": {"rollout": 1},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    beats = [
        beat(
            "trainer",
            "t",
            {
                'miles_bleed_ratio{side="trainer_waiting_for_data"}': 0.6,
                'miles_phase_seconds_total{phase="buffer_wait"}': 5.0,
                'miles_phase_cpu_seconds_total{phase="buffer_wait"}': 0.1,
            },
        ),
        beat(
            "rollout",
            "r",
            {
                'miles_bleed_ratio{side="rollout_waiting_for_weights"}': 0.3,
                'miles_phase_seconds_total{phase="rollout"}': 4.0,
                'miles_samples_generated_total{engine="e0"}': 40.0,
            },
        ),
    ]
    (run_dir / "metrics.json").write_bytes(msgspec.json.encode(beats))
    timeline = [
        {"time": 1000.0 + t, "step": t // 2, "bleed_ratio": {"trainer_waiting_for_data": 0.5}}
        for t in range(10)
    ]
    (run_dir / "timeline.jsonl").write_text("".join(json.dumps(p) + "\n" for p in timeline))


def beat(service: str, instance: str, metrics: dict[str, float]) -> events.Heartbeat:
    """An instance's last heartbeat, as ``metrics.json`` keeps it."""
    return events.Heartbeat(
        run_id="r",
        policy_version=-1,
        service=service,
        instance=instance,
        pid=1,
        time=1012.0,
        busy_seconds=1.0,
        wait_seconds=3.0,
        processed=1,
        metrics=metrics,
    )


def test_report_from_the_run_files(tmp_path: Path) -> None:
    write_run(tmp_path / "runs" / "r1")
    data, run_dir = report.load("r1", None, tmp_path / "runs")
    assert run_dir == tmp_path / "runs" / "r1"
    written = report.write_report(data, run_dir / "report")
    assert [path.name for path in written] == [
        "reward.png",
        "accuracy.png",
        "time.png",
        "bleed.png",
        "report.md",
    ]
    for png in written[:-1]:
        content = png.read_bytes()
        assert content.startswith(PNG) and len(content) > 10_000, png
    page = written[-1].read_text()
    assert "| held-out accuracy | 0.300 → 0.600 |" in page
    assert "| bleed: trainer waiting for data (last step) | 60% |" in page
    assert "| bleed: rollout waiting for weights (last version) | 30% |" in page
    assert "buffer_wait 5.0, rollout 4.0" in page
    for image in ("reward.png", "accuracy.png", "time.png", "bleed.png"):
        assert f"({image})" in page


def test_trainer_bleed_per_step() -> None:
    steps = [
        report.StepRecord(
            step=1, time=10.0, reward_mean=0.0, seconds={"wait_for_batch": 1.0, "train": 1.0}
        ),
        report.StepRecord(
            step=2, time=14.0, reward_mean=0.0, seconds={"wait_for_batch": 3.0, "train": 1.0}
        ),
    ]
    assert report.trainer_bleed_by_step(steps) == [0.5, 0.75]


def test_cli_report_takes_a_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_run(tmp_path / "r2", steps=2)
    assert main(["report", str(tmp_path / "r2"), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.md").exists()
    assert str(tmp_path / "out" / "bleed.png") in capsys.readouterr().out


def test_a_run_without_its_files_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"summary\.json"):
        report.load("nothing", None, tmp_path)
    assert main(["report", "nothing", "--output-dir", str(tmp_path)]) == 2


def test_the_files_miles_run_saves_read_back_as_the_view_had_them(tmp_path: Path) -> None:
    """``save_run`` writes the manifests (without their long fields) and the heartbeats as JSON;
    ``from_dir`` reads them back into the same step records and heartbeats."""
    steps = [manifest("r3", step, f"b-{step}") for step in (1, 2)]
    beats = [beat("trainer", "t", {}), beat("buffer", "b", {})]
    view = RunView(
        exists=True,
        record=RunRecord(run_id="r3", status="finished", started=1000.0, finished=1010.0, step=2),
        config={},
        steps=steps,
        evals=[
            EvalResult(
                round=2,
                after_step=2,
                policy_versions=[2],
                accuracy=0.5,
                reward_mean=0.5,
                n=2,
                expected=2,
                time=1010.0,
            )
        ],
        services={f"{b.service}/{b.instance}": b for b in beats},
        dead_letters={},
        filtered={},
    )
    run_dir = tmp_path / "r3"
    run_dir.mkdir()
    report.save_run(run_dir, view)
    (run_dir / "summary.json").write_text(json.dumps(view.summary()))
    lines = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert [list(line) for line in lines] == [
        [k for k in msgspec.structs.asdict(m) if k not in report.STEP_FIELDS_DROPPED] for m in steps
    ]
    data = report.RunData.from_dir(run_dir)
    assert data.steps == [report.StepRecord.of(m) for m in steps]
    assert data.beats == sorted(beats, key=lambda b: b.service)
    assert data.summary["samples_per_second"] == 0.6  # 6 samples in 10 s
    assert data.summary["evals"] == [{"after_step": 2, "accuracy": 0.5}]

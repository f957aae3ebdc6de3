"""Experiment tracking: the follower logs each committed step and evaluation once, with the
values of the run record; wandb (offline) and TensorBoard write them, and we read them back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb_records import history

from miles.cli.track import Follower
from miles.config import TrackingConfig
from miles.runtime.checkpoint import Manifest
from miles.runtime.run_record import EvalExample, EvalResult
from miles.telemetry.trackers import TensorBoardTracker, WandbTracker


def manifest(step: int, reward: float) -> Manifest:
    return Manifest(
        run_id="r",
        step=step,
        policy_version=step,
        weights_uri="w",
        weights_sha256="s",
        state_uri=None,
        state_sha256=None,
        state_step=0,
        batch_ids=[],
        task_ids=[],
        sample_ids=[],
        dataset_cursor=0,
        rng_state="",
        config_hash="h",
        samples=64,
        min_sample_version=step - 1,
        reward_mean=reward,
        metrics={"loss": -0.1 * step, "lr": 3e-4},
        seconds={"train": 0.5},
    )


def evaluation(after: int, accuracy: float) -> EvalResult:
    examples = [EvalExample(prompt="1+2=", completion="3", label="3", reward=1.0)]
    return EvalResult(
        round=after,
        after_step=after,
        policy_versions=[after],
        accuracy=accuracy,
        reward_mean=accuracy,
        n=20,
        expected=20,
        time=0.0,
        examples=examples,
    )


class View:
    def __init__(self) -> None:
        self.steps: list[Manifest] = []
        self.evals: list[EvalResult] = []


class Recorder:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.tables: list[tuple[int, str, list[list[Any]]]] = []

    def log(self, step: int, values: Any) -> None:
        self.logged.append((step, dict(values)))

    def table(self, step: int, name: str, columns: Any, rows: Any) -> None:
        self.tables.append((step, name, list(rows)))

    def close(self) -> None: ...


class Broken(Recorder):
    def log(self, step: int, values: Any) -> None:
        raise ConnectionError("wandb is down")


def test_each_step_and_evaluation_is_logged_once_in_order() -> None:
    recorder, broken = Recorder(), Broken()
    following = Follower([broken, recorder], completions=8)
    view = View()
    view.evals.append(evaluation(0, 0.3))
    view.steps += [manifest(1, 0.4), manifest(2, 0.5)]
    following.update(view)  # type: ignore[arg-type]
    following.update(view)  # type: ignore[arg-type]  # nothing new: nothing logged again
    view.steps.append(manifest(3, 0.6))
    view.evals.append(evaluation(2, 0.6))
    following.update(view)  # type: ignore[arg-type]
    assert [step for step, _ in recorder.logged] == [1, 2, 0, 3, 2]
    assert recorder.logged[0][1] == {
        "train/reward_mean": 0.4,
        "train/samples": 64.0,
        "train/loss": -0.1,
        "train/lr": 3e-4,
        "time/train": 0.5,
    }
    assert recorder.logged[2][1] == {"eval/accuracy": 0.3, "eval/reward_mean": 0.3, "eval/n": 20.0}
    assert recorder.tables == [(0, "eval/completions", [["1+2=", "3", "3", 1.0]])] * 1 + [
        (2, "eval/completions", [["1+2=", "3", "3", 1.0]])
    ]
    assert following.failed == {0}  # the broken tracker was dropped, the run went on


def test_wandb_offline_writes_what_the_run_record_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    tracker = WandbTracker(TrackingConfig(wandb=True), "run-1", tmp_path, {"trainer": {"lr": 1}})
    following = Follower([tracker], completions=8)
    view = View()
    view.steps += [manifest(1, 0.25), manifest(2, 0.5), manifest(3, 0.75)]
    view.evals.append(evaluation(0, 0.3))  # lands after step 3 was logged
    following.update(view)  # type: ignore[arg-type]
    following.close()
    rows = history(tmp_path)
    by_step = {row["_step"]: row for row in rows if "train/reward_mean" in row}
    assert {s: r["train/reward_mean"] for s, r in by_step.items()} == {1: 0.25, 2: 0.5, 3: 0.75}
    assert by_step[2]["train/loss"] == pytest.approx(-0.2)
    evals = [row for row in rows if "eval/accuracy" in row]
    assert evals and evals[0]["eval/accuracy"] == 0.3 and evals[0]["eval/after_step"] == 0
    tables = [row for row in rows if row.get("eval/completions/_type") == "table-file"]
    assert tables and tables[0]["eval/completions/nrows"] == 1
    assert list(tmp_path.glob("wandb/*run-*/files/media/table/eval/completions_*.table.json"))


def test_tensorboard_writes_scalars_and_the_completions_table(tmp_path: Path) -> None:
    tracker = TensorBoardTracker(tmp_path / "tb")
    following = Follower([tracker], completions=8)
    view = View()
    view.steps += [manifest(1, 0.25), manifest(2, 0.5)]
    view.evals.append(evaluation(2, 0.6))
    following.update(view)  # type: ignore[arg-type]
    following.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    rewards = [(e.step, e.value) for e in events.Scalars("train/reward_mean")]
    assert rewards == [(1, 0.25), (2, 0.5)]
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("eval/accuracy")] == [(2, 0.6)]
    (text,) = events.Tensors("eval/completions/text_summary")
    assert b"| 1+2= | 3 | 3 | 1.0 |" in text.tensor_proto.string_val[0]

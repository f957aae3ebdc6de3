"""The second example, on the conventions of the field: chat rows in Parquet rendered with the
tokenizer's chat template, a batched TRL-signature reward reading a typed column, a weighted
built-in format reward. It must raise held-out accuracy as the addition demo does. The run
reports to wandb (offline) and TensorBoard, which must hold what ``steps.jsonl`` holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launch import miles_run
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb_records import history

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RECIPE = Path(__file__).parents[2] / "examples" / "chat_math" / "recipe.py"
STEPS = 20
MARGIN = 0.15


def test_the_chat_math_example_learns(tmp_path: Path, ray_cluster: str) -> None:
    tracking = ("--set", "tracking.wandb=true", "--set", "tracking.tensorboard=true")
    wandb = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    run = miles_run(
        RECIPE, tmp_path, "chat", *tracking, steps=STEPS, ray_address=ray_cluster, env=wandb
    )
    assert "miles: checked model" in run.stdout
    assert "reward on a train row with its label as the completion: correct=0, digits_only=1" in (
        run.stdout
    )
    summary = run.summary
    before, after = summary["accuracy_before"], summary["accuracy_after"]
    assert after >= before + MARGIN, f"held-out accuracy {before:.3f} -> {after:.3f}"
    by_fn = summary["metrics"]["reward_mean_by_fn"]
    assert set(by_fn) == {"correct", "digits_only"}
    config = json.loads((tmp_path / "chat" / "config.json").read_text())
    assert config["data"]["train_path"].endswith(".parquet")

    steps = run.steps
    logged = {row["_step"]: row for row in history(tmp_path / "chat") if "train/reward_mean" in row}
    assert sorted(logged) == [s["step"] for s in steps] == list(range(1, STEPS + 1))
    for step in steps:
        assert logged[step["step"]]["train/reward_mean"] == pytest.approx(step["reward_mean"])
        assert logged[step["step"]]["train/loss"] == pytest.approx(step["metrics"]["loss"])
    evals = {
        row["eval/after_step"]: row["eval/accuracy"]
        for row in history(tmp_path / "chat")
        if "eval/accuracy" in row
    }
    assert evals == {0: before, STEPS: after}
    board = EventAccumulator(str(tmp_path / "chat" / "tensorboard"))
    board.Reload()
    assert [e.value for e in board.Scalars("train/reward_mean")] == pytest.approx(
        [s["reward_mean"] for s in steps]
    )

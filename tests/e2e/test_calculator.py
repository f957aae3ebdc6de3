"""A multi-turn agent end to end: examples/calculator's `@miles.rollout` calls a calculator tool
mid-answer, the tool's reply is masked out of the loss, and GRPO learns that the tool pays.
Held-out accuracy and the tool-call rate must rise; with the update switched off (lr = 0) they
must not. The turns show in steps.jsonl (per role, per step) and in the traces."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from launch import miles_run
from observability import OtlpReceiver, serve_otlp

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.extended]

ROOT = Path(__file__).parents[2]
RECIPE = ROOT / "examples" / "calculator" / "recipe.py"
STEPS = int(os.environ.get("MILES_E2E_STEPS", "20"))
MARGIN = 0.30  # held-out accuracy points GRPO must add within STEPS steps (measured: +0.66)


def run_calculator(
    tmp_path: Path, ray_address: str, name: str, *overrides: str, otlp: OtlpReceiver | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`miles run` of the recipe (embedded NATS and Redis, the session's Ray): its summary and
    its steps.jsonl. The warm start is cached in runs/cache (or MILES_CACHE_DIR)."""
    env = {} if otlp is None else {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp.port}"}
    run = miles_run(
        RECIPE, tmp_path, name, *overrides, steps=STEPS, ray_address=ray_address, env=env
    )
    return run.summary, run.steps


def call_rate(steps: list[dict[str, Any]]) -> float:
    """Tool calls per trained sample over ``steps``, from the turns each step counted."""
    calls = sum(step["turns"].get("tool", 0) for step in steps)
    return calls / sum(step["samples"] for step in steps)


def mean_reward(steps: list[dict[str, Any]]) -> float:
    return sum(step["reward_mean"] for step in steps) / len(steps)


def test_grpo_learns_to_call_the_tool_and_lr0_does_not(tmp_path: Path, ray_cluster: str) -> None:
    with serve_otlp() as receiver:
        learned, learned_steps = run_calculator(tmp_path, ray_cluster, "calc-learn", otlp=receiver)
    control, control_steps = run_calculator(
        tmp_path, ray_cluster, "calc-control", "--set", "trainer.lr=0"
    )

    assert learned["steps"] == STEPS and control["steps"] == STEPS
    assert learned["accuracy_after"] - learned["accuracy_before"] >= MARGIN, learned
    assert control["accuracy_after"] == control["accuracy_before"], control
    assert control["accuracy_before"] == learned["accuracy_before"]

    # Every step counted its samples' turns; the policy calls the tool more and more.
    assert all(step["turns"]["assistant"] >= step["samples"] for step in learned_steps)
    first, last = learned_steps[:5], learned_steps[-5:]
    assert call_rate(last) >= call_rate(first) + 0.3, [s["turns"] for s in learned_steps]
    assert call_rate(control_steps[-5:]) < call_rate(control_steps[:5]) + 0.15
    # The training reward (of the groups trained on: zero-variance groups are filtered) too.
    assert mean_reward(last) >= mean_reward(first) + 0.1
    assert mean_reward(control_steps[-5:]) < mean_reward(control_steps[:5]) + 0.1

    # The rollout's generate spans carry each sample's turns.
    turns = [
        [value.string_value for value in received.attributes["miles.turns"].values]
        for received in receiver.spans
        if received.span.name == "generate" and "miles.turns" in received.attributes
    ]
    assert turns, "no generate span carried miles.turns"
    assert any("assistant tool assistant" in group for group in turns)
    assert all(set(group) <= {"assistant", "assistant tool assistant"} for group in turns)

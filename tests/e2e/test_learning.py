"""The whole loop, as `make demo` runs it: five service processes, embedded NATS and Redis, a
local Ray, a real transformer. GRPO must raise held-out accuracy; the same run with the update
switched off (lr = 0) must not."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from launch import miles_run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).parents[2]
RECIPE = ROOT / "examples" / "addition" / "recipe.py"
STEPS = int(os.environ.get("MILES_E2E_STEPS", "20"))
MARGIN = 0.10  # accuracy points GRPO must add within STEPS steps


def run_demo(tmp_path: Path, ray_address: str, name: str, *overrides: str) -> dict[str, Any]:
    """`miles run` of the demo (the warm start is cached in runs/cache, shared with the demo)."""
    return miles_run(
        RECIPE, tmp_path, name, *overrides, steps=STEPS, ray_address=ray_address
    ).summary


def test_grpo_raises_held_out_accuracy_and_lr0_does_not(tmp_path: Path, ray_cluster: str) -> None:
    learned = run_demo(tmp_path, ray_cluster, "e2e-learn")
    control = run_demo(tmp_path, ray_cluster, "e2e-control", "--set", "trainer.lr=0")

    assert learned["steps"] == STEPS and control["steps"] == STEPS
    gain = learned["accuracy_after"] - learned["accuracy_before"]
    assert gain >= MARGIN, learned
    # Same seeds, same warm start, no update: greedy accuracy cannot move at all.
    assert control["accuracy_after"] == control["accuracy_before"], control
    assert control["accuracy_before"] == learned["accuracy_before"]
    # Every service reported its time, as five separate processes.
    assert set(learned["services"]) == {"coordinator", "rollout", "reward", "buffer", "trainer"}


def test_the_demo_learns_on_the_megatron_backend_too(tmp_path: Path, ray_cluster: str) -> None:
    """`trainer.backend = "megatron"`: a Megatron-core GPTModel split over two tensor-parallel
    rank actors (gloo) in a placement group trains the same demo, and accuracy rises."""
    steps = 8
    learned = run_demo(
        tmp_path,
        ray_cluster,
        "e2e-megatron",
        *("--set", "trainer.backend=megatron", "--set", "trainer.tensor_parallel=2"),
        *("--set", f"run.steps={steps}", "--set", f"coordinator.eval_every={steps}"),
        *("--set", "data.eval_size=100"),
    )
    assert learned["steps"] == steps
    assert learned["accuracy_after"] - learned["accuracy_before"] >= MARGIN, learned


@pytest.mark.extended
def test_the_demo_learns_on_fsdp_ranks_too(tmp_path: Path, ray_cluster: str) -> None:
    """`trainer.backend = "fsdp"`: the torch step over two FSDP2 rank actors (gloo) in a
    placement group, each sharding the model and training its half of every batch, learns the
    same demo; the ranks gather the weights into the blob store after each step."""
    steps = 8
    learned = run_demo(
        tmp_path,
        ray_cluster,
        "e2e-fsdp",
        *("--set", "trainer.backend=fsdp", "--set", "trainer.fsdp_ranks=2"),
        *("--set", f"run.steps={steps}", "--set", f"coordinator.eval_every={steps}"),
        *("--set", "data.eval_size=100"),
    )
    assert learned["steps"] == steps
    assert learned["accuracy_after"] - learned["accuracy_before"] >= MARGIN, learned


@pytest.mark.parametrize("weight_sync", ["distributed", "tensor"])
def test_the_trainer_can_push_weights_into_the_engines(
    tmp_path: Path, ray_cluster: str, weight_sync: str
) -> None:
    """The trainer pushes each committed version into the engine, checked by per-tensor
    checksums, and the engine never needs the blob store. `distributed`: over a process group
    (gloo: the NCCL path's protocol). `tensor`: `/update_weights_from_tensor` with handles to
    the trainer's memory (shared memory: the CUDA IPC path's protocol)."""
    steps = 6
    run_id = f"e2e-push-{weight_sync}"
    learned = run_demo(
        tmp_path,
        ray_cluster,
        run_id,
        *("--set", f"rollout.weight_sync={weight_sync}", "--set", f"run.steps={steps}"),
        *("--set", f"coordinator.eval_every={steps}", "--set", "data.eval_size=100"),
    )
    assert learned["steps"] == steps
    assert learned["accuracy_after"] - learned["accuracy_before"] >= MARGIN, learned
    logs = tmp_path / run_id / "logs"
    trainer = (logs / "trainer.log").read_text()
    for version in range(1, steps + 1):
        assert f"pushed v{version} ({weight_sync}) into 1 of 1 engine(s)" in trainer
    assert "engines now at policy version" not in (logs / "rollout.log").read_text()

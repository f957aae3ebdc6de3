"""The demo with LoRA on (``trainer.lora``): only rank-8 adapters train, the engines get the
merged weights, and held-out accuracy rises as with full fine-tuning (test_learning.py).

LoRA takes a higher learning rate than a full fine-tune (Schulman et al. 2025, "LoRA Without
Regret", find the best LoRA rate about 10x the full one); on the demo, 20 steps at rank 8 gave
held-out accuracy 0.325 -> 0.565 at 3e-4 (the recipe's full fine-tuning rate), 0.64 at 1e-3
and 0.625 at 3e-3, against 0.655 for full fine-tuning at 3e-4.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_learning import MARGIN, STEPS, run_demo

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.extended]

LORA = ("--set", "trainer.lora.rank=8", "--set", "trainer.lr=1e-3")


def test_lora_raises_held_out_accuracy(tmp_path: Path, ray_cluster: str) -> None:
    learned = run_demo(tmp_path, ray_cluster, "e2e-lora", *LORA)
    assert learned["steps"] == STEPS
    assert learned["accuracy_after"] - learned["accuracy_before"] >= MARGIN, learned


@pytest.mark.parametrize("weight_sync", ["distributed", "tensor"])
def test_lora_weights_pushed_into_the_engines_are_the_merged_ones(
    tmp_path: Path, ray_cluster: str, weight_sync: str
) -> None:
    """The push paths send the merged tensors under HF names; the engine checks each against
    the announced checksum and loads them as a plain model, and accuracy rises."""
    steps = 6
    run_id = f"e2e-lora-push-{weight_sync}"
    learned = run_demo(
        tmp_path,
        ray_cluster,
        run_id,
        *LORA,
        *("--set", f"rollout.weight_sync={weight_sync}", "--set", f"run.steps={steps}"),
        *("--set", f"coordinator.eval_every={steps}", "--set", "data.eval_size=100"),
    )
    assert learned["steps"] == steps
    assert learned["accuracy_after"] - learned["accuracy_before"] >= MARGIN, learned
    trainer = (tmp_path / run_id / "logs" / "trainer.log").read_text()
    for version in range(1, steps + 1):
        assert f"pushed v{version} ({weight_sync}) into 1 of 1 engine(s)" in trainer

"""Every algorithm family learns the demo through the same five services.

Each run is `make demo`'s recipe with ``--set algorithm.name=...`` (so the algorithm starts from
its paper's defaults, see ``miles.config.algorithm``), 20 steps, the same seed and warm start
as the GRPO test in test_learning.py. Held-out greedy accuracy must rise by ``MARGIN``. The
control is test_learning's lr = 0 run: with no update no algorithm can move accuracy (same
seed, same warm start), and its accuracy_before is the one every run here starts from.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_learning import MARGIN, STEPS, run_demo

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.algorithms]

FAMILIES = {
    # DAPO's overlong punishment starts at max_new_tokens - L_cache: the demo's 4 tokens would
    # punish every 3-digit answer to 0 (benchmarks/bench_algorithms.py measures it), so 8
    "dapo": ["rollout.max_new_tokens=8"],
    "dr_grpo": [],
    "gspo": [],
    "cispo": [],
    "rloo": [],
    "reinforce_pp": [],
    # a critic trained alongside: GAE advantages, 2 epochs x 2 mini-batches (the preset)
    "ppo": [],
    # offline DPO on the recipe's preference pairs, at a third of the RL learning rate (at 3e-4
    # it rises, then falls below its start by step 20); and with RPO's NLL term at 3e-4
    "dpo": ["trainer.lr=1e-4"],
    "dpo-nll": ["algorithm.nll_coef=1.0"],
    # several optimizer steps per batch: pi_old is the trainer's policy before the first
    "grpo-ppo-epochs": ["algorithm.ppo_epochs=2", "algorithm.mini_batches=2"],
    # truncated importance sampling between the engine's and the trainer's logprobs
    "grpo-tis": ["algorithm.correction.mode=tis"],
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_algorithm_raises_held_out_accuracy(tmp_path: Path, ray_cluster: str, family: str) -> None:
    name = family.split("-")[0]
    overrides = [f"algorithm.name={name}", *FAMILIES[family]]
    summary = run_demo(
        tmp_path,
        ray_cluster,
        f"e2e-{family.replace('_', '-')}",
        *(arg for setting in overrides for arg in ("--set", setting)),
    )
    assert summary["steps"] == STEPS
    assert summary["accuracy_after"] - summary["accuracy_before"] >= MARGIN, summary

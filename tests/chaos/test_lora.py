"""kill -9 with LoRA on: the adapters come back from the step's weights directory (beside the
merged weights, covered by their sha256) and their moments from the trainer's state, so every
step's merged weights equal a clean LoRA run's, bit for bit."""

from __future__ import annotations

import pytest

from .conftest import Chaos
from .test_kill9 import check

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.extended]

LORA = ["trainer.lora.rank=8", "trainer.lr=1e-3"]


def test_trainer_killed_before_commit_with_lora(chaos: Chaos) -> None:
    reference = check(chaos, chaos.run("lora", settings=LORA))
    run_id = "lora-killed"
    finished = chaos.run(run_id, crash_at="trainer.stepped@3", settings=LORA)
    assert chaos.marker(run_id).exists(), "trainer.stepped was never reached"
    assert finished.summary["restarts"]["trainer"] >= 1
    assert check(chaos, finished) == reference

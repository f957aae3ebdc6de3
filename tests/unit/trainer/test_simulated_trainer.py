"""The simulated trainer: asks ``sleep`` for its configured time, and is deterministic.

What every backend must do (weights round trip, resume bit for bit, lr 0) is the contract
suite's (``tests/contract/test_trainer_backend.py``, which runs it as "simulated").
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from miles.config import SimulatedTrainerConfig, TrainerConfig
from miles.events import TrainSample
from miles.shards import WEIGHTS_FILE
from miles.trainer.simulated import SimulatedTrainer

TIMING = SimulatedTrainerConfig(seconds_per_step=2.0, seconds_per_sample=0.25, save_seconds=0.5)
TRAINER = TrainerConfig(lr=0.1, simulated=TIMING)


def samples(count: int) -> list[TrainSample]:
    return [
        TrainSample(
            sample_id=f"t0/{index}",
            prompt_ids=[1, 2],
            response_ids=[3, 4, 5],
            response_logprobs=[-0.5, -1.0, -1.5],
            advantage=1.0 if index % 2 else -0.5,
            reward=float(index % 2),
            policy_version=0,
        )
        for index in range(count)
    ]


def trainer(slept: list[float], seed: int = 0) -> SimulatedTrainer:
    return SimulatedTrainer(TRAINER, seed, sleep=slept.append)


def test_a_step_sleeps_its_fixed_time_plus_its_samples_time() -> None:
    slept: list[float] = []
    metrics = trainer(slept).train_step(samples(4))
    assert slept == [pytest.approx(2.0 + 4 * 0.25)]
    assert metrics.seconds_forward_backward == slept[0]
    assert metrics.tokens == 12


def test_the_same_seed_and_batches_give_the_same_weights_and_metrics(tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        backend = trainer([])
        metrics = [backend.train_step(samples(4)).to_dict() for _ in range(3)]
        digest = backend.save_weights(str(tmp_path / name))
        runs.append((metrics, digest))
    assert runs[0] == runs[1]
    assert trainer([], seed=1).save_weights(str(tmp_path / "c")) != runs[0][1]


def test_saved_weights_are_tiny_and_take_the_save_time(tmp_path: Path) -> None:
    slept: list[float] = []
    digest = trainer(slept).save_weights(str(tmp_path))
    weights = (tmp_path / WEIGHTS_FILE).read_bytes()
    assert hashlib.sha256(weights).hexdigest() == digest
    assert len(weights) < 1024 and (tmp_path / "config.json").is_file()
    assert slept == [0.5]

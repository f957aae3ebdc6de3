"""Learning-rate schedules as a pure function of the step, and the trainer actor setting the rate
of every step from its number, so a restarted actor resumes at exactly the uninterrupted rate."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from miles.config import MilesConfig
from miles.trainer.schedule import lr_factor
from services.trainer.actor import TrainerActor
from tests.contract.test_trainer_backend import make_samples

RECIPE = Path(__file__).parents[3] / "examples" / "addition" / "recipe.py"


def test_warmup_is_linear_from_one_step_in() -> None:
    # warmup 4: steps 0..3 train at 1/4, 2/4, 3/4, 4/4 of the rate, whatever comes after
    for schedule in ("constant", "linear", "cosine"):
        factors = [lr_factor(s, schedule, 4, 10, 0.0) for s in range(4)]  # type: ignore[arg-type]
        assert factors == [0.25, 0.5, 0.75, 1.0]


def test_linear_and_cosine_decay_to_the_floor() -> None:
    # warmup 2, decay over steps 2..12 (10 steps), floor 0.1: progress p = (s - 2) / 10
    assert lr_factor(7, "linear", 2, 12, 0.1) == pytest.approx(1 - 0.9 * 0.5)
    assert lr_factor(7, "cosine", 2, 12, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(4, "cosine", 2, 12, 0.1) == pytest.approx(
        0.1 + 0.9 * (1 + math.cos(math.pi * 0.2)) / 2
    )
    for schedule in ("linear", "cosine"):
        assert lr_factor(2, schedule, 2, 12, 0.1) == pytest.approx(1.0)  # type: ignore[arg-type]
        assert lr_factor(12, schedule, 2, 12, 0.1) == pytest.approx(0.1)  # type: ignore[arg-type]
        assert lr_factor(50, schedule, 2, 12, 0.1) == pytest.approx(0.1)  # type: ignore[arg-type]
    assert lr_factor(50, "constant", 2, 12, 0.1) == 1.0


def _actor(tiny_model: Path) -> TrainerActor:
    config = MilesConfig()
    config.model.path = tiny_model
    config.run.steps = 6
    config.trainer.threads = 1
    config.trainer.lr = 1e-3
    config.trainer.lr_schedule = "cosine"
    config.trainer.warmup_steps = 2
    return TrainerActor(str(RECIPE), config.model_dump_json())


def test_the_actor_trains_each_step_at_its_scheduled_rate_and_resumes_there(
    tiny_model: Path, tmp_path: Path
) -> None:
    actor = _actor(tiny_model)
    rates = []
    for step in range(4):
        rates.append(actor.train_step(make_samples(step), step).lr)
        if step == 2:
            actor.save_weights(str(tmp_path / "v3"), 3)
            actor.save_state(str(tmp_path / "s3"), 3)
    uninterrupted = actor.save_weights(str(tmp_path / "v4"), 4)
    expected = [1e-3 * lr_factor(s, "cosine", 2, 6, 0.0) for s in range(4)]
    assert rates == pytest.approx(expected, abs=1e-15)
    assert rates[:2] == pytest.approx([5e-4, 1e-3])

    restarted = _actor(tiny_model)  # as Ray restarts it: the base model, step 0
    restarted.load_weights(str(tmp_path / "v3"), 3)
    restarted.load_state(str(tmp_path / "s3"))
    assert restarted.train_step(make_samples(3), 3).lr == rates[3]
    assert restarted.save_weights(str(tmp_path / "r4"), 4) == uninterrupted  # bit for bit

"""The trainer actor refuses a call made for another step's weights: after Ray restarts it,
it holds the base model, and a call that reached it must fail rather than train or save those."""

from __future__ import annotations

from pathlib import Path

import pytest

from miles.config import MilesConfig
from services.trainer.actor import StaleWeights, TrainerActor

RECIPE = Path(__file__).parents[3] / "examples" / "addition" / "recipe.py"


def test_calls_for_another_step_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    config = MilesConfig()
    config.model.path = tiny_model
    config.trainer.threads = 1
    actor = TrainerActor(str(RECIPE), config.model_dump_json())  # as Ray restarts it: step 0
    actor.save_weights(str(tmp_path / "v0"), 0)
    with pytest.raises(StaleWeights, match="holds step 0's weights, the service expects step 3"):
        actor.save_weights(str(tmp_path / "v3"), 3)
    with pytest.raises(StaleWeights):
        actor.train_step([], 3)
    with pytest.raises(StaleWeights):
        actor.rng_state(3)
    actor.load_weights(str(tmp_path / "v0"), 3)  # what resume does: now it holds step 3
    assert actor.rng_state(3)
    assert not (tmp_path / "v3").exists()

"""The trainer's Ray actor: a training backend, built inside the worker from the recipe path.

The actor loads the recipe itself (for an ``@miles.update`` function) instead of receiving the
function pickled from the service, so a recipe needs no importable module name.
"""

from __future__ import annotations

from typing import Any

from miles.config import MilesConfig
from miles.events import TrainSample
from miles.recipe import load_recipe
from miles.trainer.torch_backend import TorchTrainer


class TrainerActor:
    def __init__(self, recipe_path: str, config_json: str) -> None:
        config = MilesConfig.model_validate_json(config_json)
        recipe = load_recipe(recipe_path)
        assert config.model.path is not None, "model.path is required"
        self.backend = TorchTrainer(
            str(config.model.path),
            config.trainer,
            config.grpo_resolved(),
            config.run.seed,
            recipe.update,
        )

    def train_step(self, samples: list[TrainSample]) -> dict[str, Any]:
        return self.backend.train_step(samples)

    def save_weights(self, directory: str) -> str:
        return self.backend.save_weights(directory)

    def load_weights(self, directory: str) -> None:
        self.backend.load_weights(directory)

    def save_state(self, directory: str) -> str:
        return self.backend.save_state(directory)

    def load_state(self, directory: str) -> None:
        self.backend.load_state(directory)

    def rng_state(self) -> str:
        return self.backend.rng_state()

    def set_rng_state(self, encoded: str) -> None:
        self.backend.set_rng_state(encoded)

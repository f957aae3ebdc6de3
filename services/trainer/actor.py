"""The trainer's Ray actor: a training backend, built inside the worker from the recipe path.

The actor loads the recipe itself (for an ``@miles.update`` function) instead of receiving the
function pickled from the service, so a recipe needs no importable module name.
"""

from __future__ import annotations

import time
from typing import Any

from miles.config import MilesConfig
from miles.events import TrainSample
from miles.recipe import load_recipe
from miles.trainer.torch_backend import STATE_FILE as TORCH_STATE_FILE
from miles.trainer.torch_backend import TorchTrainer
from miles.trainer.weight_push import (
    Broadcast,
    SharedTensors,
    Transport,
    WeightPush,
    unique_tensors,
)


class TrainerActor:
    def __init__(self, recipe_path: str, config_json: str) -> None:
        config = MilesConfig.model_validate_json(config_json)
        recipe = load_recipe(recipe_path)
        assert config.model.path is not None, "model.path is required"
        trainer = config.trainer
        self.rollout = config.rollout
        self.pusher: WeightPush | None = None
        self.backend: Any
        if trainer.backend == "megatron":  # imported here: megatron-core is an optional extra
            from miles.trainer.megatron.checkpoint import STATE_FILE as MEGATRON_STATE_FILE
            from miles.trainer.megatron.model import MegatronLayout
            from miles.trainer.megatron.ray_group import MegatronRayGroup

            if recipe.update is not None:
                raise ValueError("an @miles.update step needs trainer.backend = 'torch'")
            layout = MegatronLayout(
                trainer.tensor_parallel, trainer.pipeline_parallel, trainer.data_parallel
            )
            # The ranks are actors of their own in a placement group; this actor only drives
            # them, so trainer.num_cpus is shared out among the ranks.
            self.backend = MegatronRayGroup(
                str(config.model.path),
                trainer,
                config.grpo_resolved(),
                config.run.seed,
                layout,
                cpus_per_rank=trainer.num_cpus / layout.world_size,
            )
            self.state_file = MEGATRON_STATE_FILE
        else:
            self.backend = TorchTrainer(
                str(config.model.path),
                trainer,
                config.grpo_resolved(),
                config.run.seed,
                recipe.update,
            )
            self.state_file = TORCH_STATE_FILE

    def train_step(self, samples: list[TrainSample]) -> dict[str, Any]:
        """One step; ``cpu_seconds`` is this worker's CPU time for it (all threads), for the
        service's CPU-per-phase metrics: the work runs here, not in the service process."""
        cpu = time.process_time()
        metrics = self.backend.train_step(samples)
        return {**metrics, "cpu_seconds": time.process_time() - cpu}

    def push_weights(self, urls: list[str], version: int) -> list[str]:
        """Push the weights into the engines at ``urls`` (rollout.weight_sync = "distributed"
        or "tensor"); returns the urls that hold them."""
        if not isinstance(self.backend, TorchTrainer):
            raise NotImplementedError("pushing weights into engines needs trainer.backend='torch'")
        if self.pusher is None:
            transport: Transport
            if self.rollout.weight_sync == "tensor":
                transport = SharedTensors(self.rollout.engine_tp)
            else:  # NCCL when the weights live on a GPU, else gloo
                transport = Broadcast("nccl" if self.backend.device.type == "cuda" else "gloo")
            self.pusher = WeightPush(transport)
        named = unique_tensors(self.backend.model.state_dict())
        return self.pusher.send(urls, named, version)

    def state_file_name(self) -> str:
        """The file of a full-state directory whose sha256 ``save_state`` returns."""
        return self.state_file

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

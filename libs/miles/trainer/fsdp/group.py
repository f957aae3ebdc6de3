"""FSDP ranks as Ray actors in one placement group, driven as one ``TrainerBackend``.

The orchestration of ``miles.trainer.megatron.ray_group``: one bundle and one actor per rank
(``miles.trainer.rank_actors``), rank 0 picks the rendezvous address, every rank builds its
``FsdpTrainer`` concurrently, and every call goes to every rank at once (FSDP's all-gathers and
reduce-scatters need all of them), the group returning rank 0's answer. One shared filesystem
for the model and the checkpoints.
"""

from __future__ import annotations

from typing import Any

import ray
from ray import ObjectRef
from ray.util.placement_group import remove_placement_group
from torch import Tensor

from miles.config import Algorithm, TrainerConfig
from miles.events import TrainSample
from miles.trainer.fsdp import rank as fsdp_rank
from miles.trainer.protocol import StepMetrics
from miles.trainer.rank_actors import place_ranks


class FsdpRank:
    """One rank's process: joins the group, then holds that rank's ``FsdpTrainer``."""

    def __init__(self) -> None:
        self._backend: fsdp_rank.FsdpTrainer | None = None

    def rendezvous_address(self) -> str:
        from miles.runtime.embedded import free_port

        return f"tcp://{ray.util.get_node_ip_address()}:{free_port('')}"

    def start(
        self,
        rank: int,
        world_size: int,
        init_method: str,
        model_path: str,
        trainer: TrainerConfig,
        algorithm: Algorithm,
        seed: int,
        trust_remote_code: bool,
    ) -> None:
        fsdp_rank.initialize(rank, world_size, init_method, trainer.device)
        self._backend = fsdp_rank.FsdpTrainer(
            model_path, trainer, algorithm, seed, trust_remote_code
        )

    @property
    def backend(self) -> fsdp_rank.FsdpTrainer:
        assert self._backend is not None, "start() builds the rank's backend"
        return self._backend

    def call(self, method: str, *args: Any) -> Any:
        """``FsdpTrainer.<method>(*args)``: the rank's half of the group's collective."""
        return getattr(self.backend, method)(*args)


class FsdpRayGroup:
    """The ``TrainerBackend`` over ``world_size`` FSDP rank actors."""

    state_file = fsdp_rank.STATE_FILE

    def __init__(
        self,
        model_path: str,
        trainer: TrainerConfig,
        algorithm: Algorithm,
        seed: int,
        world_size: int,
        cpus_per_rank: float = 1.0,
        gpus_per_rank: float = 0.0,
        trust_remote_code: bool = False,
    ) -> None:
        bundle = {"CPU": cpus_per_rank} | ({"GPU": gpus_per_rank} if gpus_per_rank else {})
        self.placement_group, self.ranks = place_ranks(
            FsdpRank, world_size, bundle, "FSDP ranks", "trainer.fsdp_ranks"
        )
        init_method = ray.get(self.ranks[0].rendezvous_address.remote())
        ray.get(
            [
                actor.start.remote(
                    rank,
                    world_size,
                    init_method,
                    model_path,
                    trainer,
                    algorithm,
                    seed,
                    trust_remote_code,
                )
                for rank, actor in enumerate(self.ranks)
            ]
        )

    def train_step(self, samples: list[TrainSample]) -> StepMetrics:
        shared = ray.put(samples)  # stored once, read by every rank
        metrics: StepMetrics = self._on_all("train_step", shared)
        return metrics

    def scale_learning_rate(self, factor: float) -> None:
        self._on_all("scale_learning_rate", factor)

    def save_weights(self, directory: str) -> str:
        return str(self._on_all("save_weights", directory))

    def load_weights(self, directory: str) -> None:
        self._on_all("load_weights", directory)

    def named_tensors(self) -> dict[str, Tensor]:
        """Gathered on every rank (a collective); rank 0's copy is sent."""
        tensors: dict[str, Tensor] = self._on_all("named_tensors")
        return tensors

    def save_state(self, directory: str) -> str:
        return str(self._on_all("save_state", directory))

    def load_state(self, directory: str) -> None:
        self._on_all("load_state", directory)

    def rng_state(self) -> str:
        """Rank 0's CPU RNG state: every rank seeds the same and draws the same."""
        return str(ray.get(self.ranks[0].call.remote("rng_state")))

    def set_rng_state(self, encoded: str) -> None:
        self._on_all("set_rng_state", encoded)

    def shutdown(self) -> None:
        for actor in self.ranks:
            ray.kill(actor)
        remove_placement_group(self.placement_group)

    def _on_all(self, method: str, *args: Any) -> Any:
        """``method`` on every rank at once; rank 0's answer."""
        calls: list[ObjectRef[Any]] = [rank.call.remote(method, *args) for rank in self.ranks]
        return ray.get(calls)[0]

"""N Megatron ranks as Ray actors in one placement group, driven as one ``TrainerBackend``.

One bundle per rank (``ray.util.placement_group``, ``PACK``: ranks share a node when they fit,
which keeps gloo traffic on loopback), one actor per bundle
(``PlacementGroupSchedulingStrategy``). Rank 0's actor picks the rendezvous address on its node;
every rank then joins the gloo group and builds its ``MegatronTrainer`` concurrently.

Every call goes to every rank (Megatron's collectives need all of them) and the group returns
rank 0's answer; all ranks return the same metrics and digests anyway. The ranks read the model
and write checkpoints through paths, so they need one shared filesystem (one node here, or NFS).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray
from ray import ObjectRef
from ray.util.placement_group import remove_placement_group
from torch import Tensor

from miles.config import Algorithm, TrainerConfig
from miles.events import TrainSample
from miles.trainer.megatron import distributed
from miles.trainer.megatron.backend import MegatronTrainer
from miles.trainer.megatron.checkpoint import STATE_FILE
from miles.trainer.megatron.model import MegatronLayout
from miles.trainer.protocol import StepMetrics
from miles.trainer.rank_actors import place_ranks


class MegatronRank:
    """One rank's process: joins the group, then holds that rank's ``MegatronTrainer``.

    One method per backend call, each the rank's half of a collective the group makes on every
    rank at once.
    """

    def __init__(self) -> None:
        self._backend: MegatronTrainer | None = None

    def rendezvous_address(self) -> str:
        from miles.runtime.embedded import free_port

        return f"tcp://{ray.util.get_node_ip_address()}:{free_port('')}"

    def start(
        self,
        rank: int,
        init_method: str,
        model_path: str,
        trainer: TrainerConfig,
        algorithm: Algorithm,
        seed: int,
        layout: MegatronLayout,
    ) -> None:
        distributed.initialize(rank, layout, init_method, seed)
        self._backend = MegatronTrainer(model_path, trainer, algorithm, seed, layout)

    @property
    def backend(self) -> MegatronTrainer:
        assert self._backend is not None, "start() builds the rank's backend"
        return self._backend

    def train_step(self, samples: list[TrainSample]) -> StepMetrics:
        return self.backend.train_step(samples)

    def scale_learning_rate(self, factor: float) -> None:
        self.backend.scale_learning_rate(factor)

    def save_weights(self, directory: str) -> str:
        return self.backend.save_weights(directory)

    def load_weights(self, directory: str) -> None:
        self.backend.load_weights(directory)

    def named_tensors(self) -> dict[str, Tensor]:
        return self.backend.named_tensors()

    def save_state(self, directory: str) -> str:
        return self.backend.save_state(directory)

    def load_state(self, directory: str) -> None:
        self.backend.load_state(directory)

    def rng_state(self) -> str:
        return self.backend.rng_state()

    def set_rng_state(self, encoded: str) -> None:
        self.backend.set_rng_state(encoded)


class MegatronRayGroup:
    """The ``TrainerBackend`` over ``layout.world_size`` rank actors."""

    state_file = STATE_FILE

    def __init__(
        self,
        model_path: str,
        trainer: TrainerConfig,
        algorithm: Algorithm,
        seed: int,
        layout: MegatronLayout,
        cpus_per_rank: float = 1.0,
    ) -> None:
        self.placement_group, self.ranks = place_ranks(
            MegatronRank,
            layout.world_size,
            {"CPU": cpus_per_rank},
            "trainer ranks",
            "the layout",
        )
        init_method = ray.get(self.ranks[0].rendezvous_address.remote())
        ray.get(
            [
                actor.start.remote(rank, init_method, model_path, trainer, algorithm, seed, layout)
                for rank, actor in enumerate(self.ranks)
            ]
        )

    def train_step(self, samples: list[TrainSample]) -> StepMetrics:
        shared = ray.put(samples)  # stored once, read by every rank
        metrics: StepMetrics = self._on_all(lambda rank: rank.train_step.remote(shared))
        return metrics

    def save_weights(self, directory: str) -> str:
        return str(self._on_all(lambda rank: rank.save_weights.remote(directory)))

    def load_weights(self, directory: str) -> None:
        self._on_all(lambda rank: rank.load_weights.remote(directory))

    def named_tensors(self) -> dict[str, Tensor]:
        """Gathered over the ranks on rank 0, and sent from there."""
        tensors: dict[str, Tensor] = self._on_all(lambda rank: rank.named_tensors.remote())
        return tensors

    def scale_learning_rate(self, factor: float) -> None:
        self._on_all(lambda rank: rank.scale_learning_rate.remote(factor))

    def save_state(self, directory: str) -> str:
        return str(self._on_all(lambda rank: rank.save_state.remote(directory)))

    def load_state(self, directory: str) -> None:
        self._on_all(lambda rank: rank.load_state.remote(directory))

    def rng_state(self) -> str:
        """Rank 0's CPU RNG state: every rank seeds the same and draws the same (nothing)."""
        return str(ray.get(self.ranks[0].rng_state.remote()))

    def set_rng_state(self, encoded: str) -> None:
        self._on_all(lambda rank: rank.set_rng_state.remote(encoded))

    def shutdown(self) -> None:
        for actor in self.ranks:
            ray.kill(actor)
        remove_placement_group(self.placement_group)

    def _on_all(self, call: Callable[[Any], ObjectRef[Any]]) -> Any:
        """``call`` on every rank at once (Megatron's collectives need all of them); rank 0's
        answer."""
        return ray.get([call(rank) for rank in self.ranks])[0]

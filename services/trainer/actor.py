"""The trainer's Ray actor: a ``TrainerBackend``, built inside the worker from the recipe path.

The actor loads the recipe itself (for an ``@miles.update`` function) instead of receiving the
function pickled from the service, so a recipe needs no importable module name.

Every call that reads or changes the weights names the step the service believes they are at.
Ray restarts a dead actor by running ``__init__`` again, with the base model: without the check
a call that reached the new actor would train (or save) the wrong weights without an error.
"""

from __future__ import annotations

import time

from miles.config import MilesConfig
from miles.events import TrainSample
from miles.recipe import Recipe, load_recipe
from miles.trainer import StepMetrics, TorchTrainer, TrainerBackend
from miles.trainer.schedule import lr_factor
from miles.trainer.simulated import SimulatedTrainer
from miles.weights.push import Broadcast, SharedTensors, Transport, WeightPush, unique_tensors


class StaleWeights(RuntimeError):
    """The actor holds another step's weights than the service expects: it was restarted."""


class TrainerActor:
    def __init__(self, recipe_path: str, config_json: str) -> None:
        self.step = 0  # the step whose weights the backend holds
        config = MilesConfig.model_validate_json(config_json)
        self.backend = build_backend(config, load_recipe(recipe_path))
        self.rollout = config.rollout
        self.trainer = config.trainer
        self.decay_steps = config.trainer.decay_steps or config.run.steps
        self.pusher: WeightPush | None = None

    def _at(self, step: int) -> None:
        if step != self.step:
            raise StaleWeights(
                f"the trainer actor holds step {self.step}'s weights, the service expects step "
                f"{step}: the actor was restarted"
            )

    def train_step(self, samples: list[TrainSample], at_step: int) -> StepMetrics:
        """One step from ``at_step``; ``cpu_seconds`` is this worker's CPU time for it (all
        threads), for the service's CPU-per-phase metrics: the work runs here, not there."""
        self._at(at_step)
        cpu = time.process_time()
        t = self.trainer
        factor = lr_factor(at_step, t.lr_schedule, t.warmup_steps, self.decay_steps, t.min_lr_ratio)
        # Set before every step from the step's number alone: a restarted actor, loaded from any
        # manifest, trains the next step at the rate an uninterrupted run would have used.
        self.backend.scale_learning_rate(factor)
        metrics = self.backend.train_step(samples)
        self.step += 1
        return metrics.with_cpu_seconds(time.process_time() - cpu).with_lr(t.lr * factor)

    def push_weights(self, urls: list[str], version: int) -> list[str]:
        """Push the weights of step ``version`` into the engines at ``urls``
        (rollout.weight_sync = "distributed" or "tensor"); returns the urls that hold them."""
        self._at(version)
        named = unique_tensors(self.backend.named_tensors())
        if self.pusher is None:
            transport: Transport
            if self.rollout.weight_sync == "tensor":
                transport = SharedTensors(self.rollout.engine_tp)
            else:  # NCCL when the weights live on a GPU, else gloo
                on_gpu = any(tensor.is_cuda for tensor in named.values())
                transport = Broadcast("nccl" if on_gpu else "gloo")
            self.pusher = WeightPush(transport)
        return self.pusher.send(urls, named, version)

    def state_file_name(self) -> str:
        """The file of a full-state directory whose sha256 ``save_state`` returns."""
        return self.backend.state_file

    def save_weights(self, directory: str, at_step: int) -> str:
        self._at(at_step)
        return self.backend.save_weights(directory)

    def load_weights(self, directory: str, step: int) -> None:
        """The weights of committed step ``step``."""
        self.backend.load_weights(directory)
        self.step = step

    def save_state(self, directory: str, at_step: int) -> str:
        self._at(at_step)
        return self.backend.save_state(directory)

    def load_state(self, directory: str) -> None:
        self.backend.load_state(directory)

    def rng_state(self, at_step: int) -> str:
        self._at(at_step)
        return self.backend.rng_state()

    def set_rng_state(self, encoded: str) -> None:
        self.backend.set_rng_state(encoded)


def build_backend(config: MilesConfig, recipe: Recipe) -> TrainerBackend:
    """The backend ``trainer.backend`` names, with the recipe's ``@miles.update`` if any."""
    trainer = config.trainer.model_copy(update={"threads": config.cpu_threads().trainer})
    if recipe.update is not None and trainer.backend != "torch":
        raise ValueError("an @miles.update step needs trainer.backend = 'torch'")
    if trainer.backend == "simulated":  # benchmarks and tests: no model, sleeps for its steps
        return SimulatedTrainer(trainer, config.run.seed)
    if config.model.path is None:
        raise ValueError("model.path is not set: point it at a Hugging Face model directory")
    if trainer.backend == "fsdp":
        from miles.trainer.fsdp.group import FsdpRayGroup

        # The ranks are actors of their own; trainer.num_cpus and num_gpus are shared out.
        ranks = trainer.fsdp_ranks or 1  # None: the trainer service's layout chose none
        return FsdpRayGroup(
            str(config.model.path),
            trainer,
            config.algorithm_resolved(),
            config.run.seed,
            ranks,
            cpus_per_rank=trainer.num_cpus / ranks,
            gpus_per_rank=trainer.num_gpus / ranks,
            trust_remote_code=config.model.trust_remote_code,
        )
    if trainer.backend == "torch":
        return TorchTrainer(
            str(config.model.path),
            trainer,
            config.algorithm_resolved(),
            config.run.seed,
            recipe.update,
            trust_remote_code=config.model.trust_remote_code,
        )
    # Imported here: megatron-core is an optional extra.
    from miles.trainer.megatron.model import MegatronLayout
    from miles.trainer.megatron.ray_group import MegatronRayGroup

    layout = MegatronLayout(
        trainer.tensor_parallel, trainer.pipeline_parallel, trainer.data_parallel
    )
    # The ranks are actors of their own in a placement group; this actor only drives them, so
    # trainer.num_cpus is shared out among the ranks.
    return MegatronRayGroup(
        str(config.model.path),
        trainer,
        config.algorithm_resolved(),
        config.run.seed,
        layout,
        cpus_per_rank=trainer.num_cpus / layout.world_size,
    )

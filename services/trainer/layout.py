"""The trainer's layout at start (``trainer.layout``): the devices it has, from the config or
the Ray cluster, and the planner's choice for them (``miles.planner.auto``), logged with its
reasons. Everything the trainer builds after this uses the chosen sizes."""

from __future__ import annotations

import json
import logging

import ray

from miles import models
from miles.config import MilesConfig
from miles.planner.auto import choose_layout, model_spec

log = logging.getLogger("miles.trainer")


def with_layout(config: MilesConfig) -> MilesConfig:
    """``config`` with the trainer's layout the planner chose, when it chooses one."""
    trainer = config.trainer
    if not trainer.auto_layout or trainer.backend not in ("megatron", "fsdp"):
        return config
    devices = trainer_devices(config)
    assert config.model.path is not None, "the config's checks require model.path"
    hf_config = json.loads((models.local_dir(config.model.path) / "config.json").read_text())
    seq_length = (config.data.max_prompt_tokens or 64) + config.rollout.max_new_tokens
    batch = config.buffer.groups_per_batch * config.rollout.group_size
    choice = choose_layout(trainer, model_spec(hf_config, seq_length), devices, batch)
    for reason in choice.reasons:
        log.info("layout (trainer.layout = auto): %s", reason)
    return config.model_copy(update={"trainer": choice.apply(trainer)})


def trainer_devices(config: MilesConfig) -> int:
    """``trainer.devices``, else on cuda the GPUs the trainer reserves, or the Ray cluster's
    GPUs the engines do not hold; on cpu one (a CPU rank per core is slower than one process
    with every core's threads)."""
    trainer, rollout = config.trainer, config.rollout
    if trainer.devices is not None:
        return trainer.devices
    if trainer.device != "cuda":
        return 1
    if trainer.num_gpus >= 1:
        return int(trainer.num_gpus)
    engines = rollout.engines * rollout.engine_num_gpus
    return max(1, int(ray.cluster_resources().get("GPU", 0) - engines))

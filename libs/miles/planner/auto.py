"""``trainer.layout = "auto"``: the trainer's layout chosen by the planner for the devices it has.

The trainer service asks this at start, with the model's Hugging Face config and the devices the
Ray cluster gives the trainer, and trains with the answer; it logs the answer's reasons.

- ``megatron``: the fastest fitting TP·PP·DP layout of ``search.rank`` (the ranking behind
  `miles plan`) among those the Megatron backend runs (no context or expert parallelism, no
  virtual stages), on one node of ``devices`` devices of ``trainer.device_memory_gib`` each;
- ``fsdp``: every device is a rank: FSDP2 shards parameters, gradients and AdamW moments over
  all of them and each trains its share of the batch, so more ranks lower both the memory and
  the time per rank.

A layout the user set wins (``TrainerConfig.auto_layout``: ``trainer.layout = "explicit"``, or
a size set away from its default; ``fsdp_ranks``' default is None). Megatron on one device, or
the single-process ``torch`` backend, leaves nothing to choose.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from miles.config import TrainerConfig
from miles.planner.memory import GIB
from miles.planner.search import PlanError, rank
from miles.planner.specs import Cluster, ModelSpec, PlanOptions

ADAM_BYTES_PER_PARAM = 16
"""fp32 weights, gradients and AdamW's two moments: what FSDP2 shards in an fp32 run."""


@dataclass(frozen=True)
class LayoutChoice:
    update: dict[str, int] = field(default_factory=dict)
    """``TrainerConfig`` fields to set (empty: keep the config's)."""
    reasons: list[str] = field(default_factory=list)

    def apply(self, trainer: TrainerConfig) -> TrainerConfig:
        return trainer.model_copy(update=self.update)


def model_spec(hf_config: dict[str, Any], seq_length: int) -> ModelSpec:
    """The planner's view of a Hugging Face decoder config (``config.json``)."""
    heads = int(hf_config["num_attention_heads"])
    return ModelSpec(
        name=str(hf_config.get("model_type", "custom")),
        num_layers=int(hf_config["num_hidden_layers"]),
        hidden_size=int(hf_config["hidden_size"]),
        num_attention_heads=heads,
        num_kv_heads=int(hf_config.get("num_key_value_heads") or heads),
        ffn_hidden_size=int(hf_config["intermediate_size"]),
        vocab_size=int(hf_config["vocab_size"]),
        seq_length=seq_length,
        tied_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
    )


def choose_layout(
    trainer: TrainerConfig, spec: ModelSpec, devices: int, global_batch: int
) -> LayoutChoice:
    """The layout of ``trainer.backend`` over ``devices`` devices, and why."""
    if not trainer.auto_layout:
        return LayoutChoice(reasons=["the layout the config sets (trainer.layout = 'explicit')"])
    if trainer.backend == "fsdp":
        return _fsdp(spec, devices)
    if trainer.backend != "megatron" or devices <= 1:
        why = f"{devices} device(s) for trainer.backend = {trainer.backend!r}: nothing to choose"
        return LayoutChoice(reasons=[why])
    return _megatron(trainer, spec, devices, global_batch)


def _fsdp(spec: ModelSpec, devices: int) -> LayoutChoice:
    state = spec.total_params * ADAM_BYTES_PER_PARAM / GIB
    return LayoutChoice(
        {"fsdp_ranks": devices},
        [
            f"FSDP2 over all {devices} devices: each rank trains 1/{devices} of every batch, "
            f"and the model's weights, gradients and AdamW moments ({state:.3g} GiB in fp32) "
            f"are sharded {devices} ways ({state / devices:.3g} GiB per rank)"
        ],
    )


def _megatron(
    trainer: TrainerConfig, spec: ModelSpec, devices: int, global_batch: int
) -> LayoutChoice:
    cluster = Cluster(nodes=1, gpus_per_node=devices, gpu_memory_gib=trainer.device_memory_gib)
    options = PlanOptions(
        global_batch=global_batch,
        micro_batch=min(trainer.micro_batch_size, global_batch),
        distributed_optimizer=False,  # miles' Megatron ranks step with torch's AdamW
        interleaved_pipeline=False,
    )
    fitting, _ = rank(spec, cluster, options)
    runnable = [
        c
        for c in fitting
        if c.layout.cp == 1 and c.layout.ep == 1 and c.layout.vp == 1 and c.layout.gpus == devices
    ]
    if not runnable:
        raise PlanError(
            f"no TP·PP·DP layout of {spec.name} fits {devices} device(s) of "
            f"{trainer.device_memory_gib} GiB: set trainer.device_memory_gib or the layout"
        )
    best = runnable[0]
    layout = best.layout
    reasons = [
        f"Megatron {layout.label()} on {devices} device(s): {best.memory.total_gib:.3g} GiB "
        f"per device of {trainer.device_memory_gib} GiB, estimated {best.time.total_s:.3g} s "
        f"per step of {global_batch} sequences",
    ]
    if len(runnable) > 1:
        second = runnable[1]
        reasons.append(
            f"next: {second.layout.label()}, estimated {second.time.total_s:.3g} s per step"
        )
    update = {
        "tensor_parallel": layout.tp,
        "pipeline_parallel": layout.pp,
        "data_parallel": layout.dp,
    }
    return LayoutChoice(update, reasons)

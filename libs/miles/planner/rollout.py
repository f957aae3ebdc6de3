"""Rollout side: which GPUs generate, and how many SGLang engines of which TP they hold.

Colocated: training and rollout take turns on every GPU, each offloading its memory while the
other runs (slime's ``--colocate``), so each phase is planned against the whole GPU. Split: a
fixed share of the GPUs (whole nodes when there are several) only generates; the rest trains.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, computed_field

from miles.planner.memory import RolloutMemory, rollout_memory
from miles.planner.search import PlanError
from miles.planner.specs import Cluster, ModelSpec, PlanOptions


class RolloutPlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    gpus: int
    engine_tp: int
    engines: int
    memory: RolloutMemory
    usable_gib: float
    too_small: dict[int, float]
    """Smaller engine TPs that were tried, with the GiB per GPU they would need."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def idle_gpus(self) -> int:
        return self.gpus - self.engines * self.engine_tp


def split_gpus(cluster: Cluster, options: PlanOptions) -> tuple[Cluster, int]:
    """(the cluster training runs on, the number of rollout GPUs)."""
    if options.mode == "colocated":
        return cluster, cluster.gpus
    if cluster.nodes > 1:
        nodes = min(cluster.nodes - 1, max(1, round(cluster.nodes * options.rollout_fraction)))
        train = cluster.model_copy(update={"nodes": cluster.nodes - nodes})
        return train, nodes * cluster.gpus_per_node
    if cluster.gpus_per_node < 2:
        raise PlanError("split mode needs at least two GPUs: one to train, one to generate")
    per_node = cluster.gpus_per_node
    gpus = min(per_node - 1, max(1, round(per_node * options.rollout_fraction)))
    return cluster.model_copy(update={"gpus_per_node": per_node - gpus}), gpus


def engine_tensor_parallel_sizes(model: ModelSpec, cluster: Cluster, gpus: int) -> list[int]:
    """SGLang needs TP to divide the attention heads; KV heads are split evenly or, when TP
    exceeds them, replicated (TP a multiple of them). An engine stays inside one node."""
    return [
        tp
        for tp in range(1, min(gpus, cluster.gpus_per_node) + 1)
        if cluster.gpus_per_node % tp == 0
        and model.num_attention_heads % tp == 0
        and (model.num_kv_heads % tp == 0 or tp % model.num_kv_heads == 0)
    ]


def plan_rollout(
    model: ModelSpec, cluster: Cluster, options: PlanOptions, gpus: int
) -> RolloutPlan:
    """The smallest engine TP whose weights and KV cache fit: more, smaller engines generate
    more tokens per GPU, since every TP degree adds an all-reduce per layer per decoded token."""
    usable = cluster.gpu_memory_gib * options.rollout_memory_fraction
    too_small: dict[int, float] = {}
    for tp in engine_tensor_parallel_sizes(model, cluster, gpus):
        memory = rollout_memory(model, options, tp)
        if memory.total_gib <= usable:
            return RolloutPlan(
                gpus=gpus,
                engine_tp=tp,
                engines=gpus // tp,
                memory=memory,
                usable_gib=usable,
                too_small=too_small,
            )
        too_small[tp] = memory.total_gib
    largest = max(too_small)
    memory = rollout_memory(model, options, largest)
    tokens = options.rollout_seq_length or model.seq_length
    raise PlanError(
        f"rollout: no SGLang engine of {model.name} fits on {gpus} GPUs: at TP={largest} it "
        f"needs {memory.weights_gib:.1f} GiB of bf16 weights and {memory.kv_cache_gib:.1f} GiB "
        f"of KV cache ({options.rollout_concurrency} sequences × {tokens} tokens) per GPU, over "
        f"the {usable:.1f} GiB SGLang may use ({options.rollout_memory_fraction:.0%}). Lower "
        "rollout_concurrency or rollout_seq_length, or give rollout more GPUs."
    )

"""Training layouts: enumerate the valid ones, fit each in memory, rank by estimated step time."""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import BaseModel, ConfigDict

from miles.planner.cost import StepTime, step_time
from miles.planner.memory import MemoryBreakdown, training_memory
from miles.planner.specs import Cluster, Layout, ModelSpec, PlanOptions, Recompute


class PlanError(ValueError):
    """No layout works; the message says which constraint or memory component is to blame."""


class Candidate(BaseModel):
    model_config = ConfigDict(frozen=True)

    layout: Layout
    memory: MemoryBreakdown
    time: StepTime
    fits: bool


def usable_gib(cluster: Cluster, options: PlanOptions) -> float:
    return cluster.gpu_memory_gib * (1 - options.memory_headroom)


def tensor_parallel_sizes(model: ModelSpec, cluster: Cluster) -> list[int]:
    """Megatron shards attention heads and query groups (KV heads) over TP, so TP divides both;
    TP stays inside a node, where NVLink carries its per-layer collectives."""
    return [
        tp
        for tp in _divisors(cluster.gpus_per_node)
        if model.num_attention_heads % tp == 0 and model.num_kv_heads % tp == 0
    ]


def enumerate_layouts(model: ModelSpec, cluster: Cluster, options: PlanOptions) -> Iterator[Layout]:
    """TP·PP·CP·DP = GPUs; PP divides the layers; CP is a power of two splitting the sequence
    into 2·CP equal chunks (Megatron's load-balanced causal split), none shorter than
    min_cp_chunk; EP divides the experts and DP (expert groups are drawn from data-parallel
    ranks); DP × micro-batch divides the global batch."""
    gpus = cluster.gpus
    for tp in tensor_parallel_sizes(model, cluster):
        for pp in _divisors(gpus // tp):
            if model.num_layers % pp:
                continue
            for cp in _divisors(gpus // (tp * pp)):
                if cp & (cp - 1) or model.seq_length % (2 * cp):
                    continue
                if cp > 1 and model.seq_length // cp < options.min_cp_chunk:
                    continue
                dp = gpus // (tp * pp * cp)
                if options.global_batch % (dp * options.micro_batch):
                    continue
                for ep in _divisors(dp) if model.is_moe else [1]:
                    if model.num_experts % ep == 0:
                        yield Layout(tp=tp, pp=pp, cp=cp, dp=dp, ep=ep)


def evaluate(model: ModelSpec, cluster: Cluster, options: PlanOptions, layout: Layout) -> Candidate:
    """The fastest virtual-stage count under the cheapest recomputation that fits; with full
    recomputation and the least memory when nothing fits."""
    trials: list[Candidate] = []
    for recompute in _recompute_modes(options):
        trials = [
            _candidate(model, cluster, options, layout, recompute, vp)
            for vp in _virtual_stages(model, options, layout)
        ]
        fitting = [trial for trial in trials if trial.fits]
        if fitting:
            return min(fitting, key=lambda trial: trial.time.total_s)
    return min(trials, key=lambda trial: trial.memory.total_gib)


def _candidate(
    model: ModelSpec,
    cluster: Cluster,
    options: PlanOptions,
    layout: Layout,
    recompute: Recompute,
    vp: int,
) -> Candidate:
    layout = layout.model_copy(update={"recompute": recompute, "vp": vp})
    memory = training_memory(model, options, layout)
    return Candidate(
        layout=layout,
        memory=memory,
        time=step_time(model, options, cluster, layout),
        fits=memory.total_gib <= usable_gib(cluster, options),
    )


def rank(
    model: ModelSpec, cluster: Cluster, options: PlanOptions
) -> tuple[list[Candidate], list[Candidate]]:
    """(fitting candidates, fastest first; the others, smallest memory first)."""
    candidates = [
        evaluate(model, cluster, options, layout)
        for layout in enumerate_layouts(model, cluster, options)
    ]
    if not candidates:
        raise PlanError(_no_layout_message(model, cluster, options))
    fitting = sorted((c for c in candidates if c.fits), key=_speed_key)
    others = sorted((c for c in candidates if not c.fits), key=lambda c: c.memory.total_gib)
    if not fitting:
        raise PlanError(_too_big_message(model, cluster, options, others[0]))
    return fitting, others


def _speed_key(candidate: Candidate) -> tuple[float, int, int, int]:
    layout = candidate.layout  # ties: less model parallelism is simpler to run
    return (
        round(candidate.time.total_s, 9),
        layout.tp * layout.pp * layout.cp,
        layout.pp,
        layout.ep,
    )


def _recompute_modes(options: PlanOptions) -> list[Recompute]:
    # Under FlashAttention the attention core is never stored, so "selective" saves nothing.
    return ["none", "full"] if options.flash_attention else ["none", "selective", "full"]


def _virtual_stages(model: ModelSpec, options: PlanOptions, layout: Layout) -> list[int]:
    """Megatron interleaves only when the micro-batch count is a multiple of PP; each virtual
    stage holds a whole number of layers."""
    micro_batches = options.global_batch // (layout.dp * options.micro_batch)
    if layout.pp == 1 or not options.interleaved_pipeline or micro_batches % layout.pp:
        return [1]
    return _divisors(model.num_layers // layout.pp)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _no_layout_message(model: ModelSpec, cluster: Cluster, options: PlanOptions) -> str:
    tps = tensor_parallel_sizes(model, cluster)
    return (
        f"no parallel layout of {model.name} exists on {cluster.gpus} GPUs: TP must be one of "
        f"{tps} (it divides {model.num_attention_heads} heads, {model.num_kv_heads} KV heads and "
        f"{cluster.gpus_per_node} GPUs per node), PP must divide {model.num_layers} layers, and "
        f"the global batch ({options.global_batch}) must be a multiple of DP × micro-batch "
        f"({options.micro_batch}). Change --gpus or --global-batch."
    )


def _too_big_message(
    model: ModelSpec, cluster: Cluster, options: PlanOptions, smallest: Candidate
) -> str:
    memory, budget = smallest.memory, usable_gib(cluster, options)
    state = memory.weights_gib + memory.gradients_gib + memory.optimizer_gib
    if memory.weights_gib > budget:
        culprit = f"the bf16 weights alone take {memory.weights_gib:.1f} GiB"
    elif memory.weights_gib + memory.gradients_gib > budget:
        culprit = (
            f"weights ({memory.weights_gib:.1f} GiB) and gradients "
            f"({memory.gradients_gib:.1f} GiB) alone exceed it"
        )
    elif state > budget:
        culprit = (
            f"weights ({memory.weights_gib:.1f} GiB), gradients ({memory.gradients_gib:.1f} "
            f"GiB) and Adam states ({memory.optimizer_gib:.1f} GiB) together take {state:.1f} GiB"
        )
    else:
        culprit = (
            f"activations take {memory.activations_gib:.1f} GiB even with "
            f"{smallest.layout.recompute} recomputation, on top of {state:.1f} GiB of weights, "
            "gradients and optimizer states"
        )
    return (
        f"{model.name} does not fit on {cluster.gpus} × {cluster.gpu_memory_gib:g} GiB GPUs "
        f"({budget:.1f} GiB usable after {options.memory_headroom:.0%} headroom): the most "
        f"memory-frugal layout, {smallest.layout.label()}, needs {memory.total_gib:.1f} GiB "
        f"per GPU; {culprit}. Add GPUs, use larger GPUs, or shorten the sequence."
    )

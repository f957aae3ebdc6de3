"""The choice in words: why this layout, what ruled out the others, how rollout is laid out."""

from __future__ import annotations

from miles.planner.rollout import RolloutPlan
from miles.planner.search import Candidate, tensor_parallel_sizes, usable_gib
from miles.planner.specs import Cluster, ModelSpec, PlanOptions


def explain(
    model: ModelSpec,
    cluster: Cluster,
    options: PlanOptions,
    fitting: list[Candidate],
    others: list[Candidate],
    rollout: RolloutPlan,
) -> list[str]:
    choice = fitting[0]
    lines = [_chosen(cluster, options, choice, len(fitting))]
    if len(fitting) > 1:
        lines.append(_runner_up(choice, fitting[1]))
    lines.append(_limits(model, cluster, options, choice, others))
    lines.append(_rollout(model, options, rollout))
    return lines


def _chosen(cluster: Cluster, options: PlanOptions, choice: Candidate, count: int) -> str:
    layout, time = choice.layout, choice.time
    overhead, seconds = next(iter(time.overheads().items()))
    recompute = "" if layout.recompute == "none" else f" with {layout.recompute} recomputation"
    text = (
        f"Training uses {layout.label()}{recompute}: the fastest of {count} layouts that fit, "
        f"at an estimated {time.total_s:.1f} s per step and {choice.memory.total_gib:.1f} of "
        f"{usable_gib(cluster, options):.1f} usable GiB per GPU."
    )
    if seconds > 0:
        text += f" Its largest overhead is {overhead} ({seconds / time.total_s:.1%} of the step)."
    return text


def _runner_up(choice: Candidate, second: Candidate) -> str:
    slower = second.time.total_s / choice.time.total_s - 1
    ours, theirs = choice.time.parts(), second.time.parts()
    name, delta = max(((k, theirs[k] - ours[k]) for k in ours), key=lambda item: item[1])
    if name == "compute" and second.layout.recompute != choice.layout.recompute:
        name = "recomputation"
    return (
        f"The runner-up, {second.layout.label()}, is {slower:.1%} slower, mostly from more "
        f"{name} (+{delta:.2f} s)."
    )


def _limits(
    model: ModelSpec,
    cluster: Cluster,
    options: PlanOptions,
    choice: Candidate,
    others: list[Candidate],
) -> str:
    tps = tensor_parallel_sizes(model, cluster)
    text = (
        f"TP can only be {', '.join(map(str, tps))}: it must divide {model.num_attention_heads} "
        f"heads and {model.num_kv_heads} KV heads and stay within one node "
        f"({cluster.gpus_per_node} GPUs); PP must divide {model.num_layers} layers; CP is at "
        f"most {_max_cp(model, options)} (chunks of {options.min_cp_chunk}+ of "
        f"{model.seq_length} tokens); DP × micro-batch ({options.micro_batch}) must divide "
        f"the global batch ({options.global_batch})."
    )
    if others:
        simplest = min(others, key=lambda c: (c.layout.tp * c.layout.pp * c.layout.cp, c.layout.tp))
        memory = simplest.memory
        parts = {
            "weights": memory.weights_gib,
            "gradients": memory.gradients_gib,
            "optimizer states": memory.optimizer_gib,
            "activations": memory.activations_gib,
        }
        largest = max(parts, key=lambda name: parts[name])
        text += (
            f" {len(others)} layouts do not fit even with full recomputation; "
            f"{simplest.layout.label()}, for one, needs {memory.total_gib:.1f} GiB per GPU, "
            f"{parts[largest]:.1f} of it {largest}."
        )
    if choice.layout.recompute != "none":
        text += (
            f" The choice itself fits only with {choice.layout.recompute} recomputation, "
            "which repeats the forward pass in the backward."
        )
    return text


def _max_cp(model: ModelSpec, options: PlanOptions) -> int:
    cp = 1
    while model.seq_length // (2 * cp) >= options.min_cp_chunk:
        cp *= 2
    return cp


def _rollout(model: ModelSpec, options: PlanOptions, rollout: RolloutPlan) -> str:
    memory = rollout.memory
    tokens = options.rollout_seq_length or model.seq_length
    text = (
        f"Rollout runs {rollout.engines} SGLang engine(s) at TP={rollout.engine_tp} on "
        f"{rollout.gpus} GPUs: {memory.weights_gib:.1f} GiB of weights and "
        f"{memory.kv_cache_gib:.1f} GiB of KV cache ({options.rollout_concurrency} sequences × "
        f"{tokens} tokens) per GPU, of {rollout.usable_gib:.1f} GiB."
    )
    if rollout.too_small:
        tried = ", ".join(f"TP={tp} needs {gib:.1f}" for tp, gib in rollout.too_small.items())
        text += f" Smaller engines do not fit ({tried} GiB)."
    if rollout.idle_gpus:
        text += f" {rollout.idle_gpus} rollout GPU(s) stay idle: they cannot form an engine."
    if options.mode == "colocated":
        text += (
            " Colocated: training and rollout take turns on the same GPUs, each offloading its "
            "memory while the other runs."
        )
    else:
        text += (
            f" Split: rollout keeps {rollout.gpus} GPUs to itself and training gets the rest, "
            "so both run at once but each on fewer GPUs."
        )
    return text

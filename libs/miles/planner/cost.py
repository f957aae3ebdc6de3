"""Estimated time of one training step: compute at an assumed MFU plus communication.

Compute counts 6·N FLOPs per token for N active parameters, plus 12·L·h·s for attention scores;
with full recomputation this is, up to the output layer, the 96·B·s·l·h²(1 + s/6h + V/16lh)
per iteration of Narayanan et al. 2021 (arXiv:2104.04473). Recomputation adds the forward it
repeats. Communication uses ring collectives over the slowest link a group spans, with no
overlap assumed: a pessimistic but even-handed estimate (Megatron overlaps DP and CP traffic;
TP traffic sits on the critical path).

Ranks are ordered TP, CP, EP, DP, PP from the fastest-varying (Megatron's default), so a group
stays inside a node when the product of its size and the sizes ordered before it fits one.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, computed_field

from miles.planner.memory import BF16
from miles.planner.specs import Cluster, Layout, ModelSpec, PlanOptions


class StepTime(BaseModel):
    """Seconds per optimizer step, by cause; the pipeline bubble idles every term it spans."""

    model_config = ConfigDict(frozen=True)

    compute_s: float
    tp_comm_s: float
    cp_comm_s: float
    ep_comm_s: float
    pp_comm_s: float
    bubble_s: float
    dp_comm_s: float

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_s(self) -> float:
        return sum(self.parts().values())

    def parts(self) -> dict[str, float]:
        return {
            "compute": self.compute_s,
            "tensor-parallel communication": self.tp_comm_s,
            "context-parallel communication": self.cp_comm_s,
            "expert all-to-all": self.ep_comm_s,
            "pipeline send/receive": self.pp_comm_s,
            "pipeline bubble": self.bubble_s,
            "gradient reduction": self.dp_comm_s,
        }

    def overheads(self) -> dict[str, float]:
        """Everything but compute, largest first."""
        named = self.parts()
        del named["compute"]
        return dict(sorted(named.items(), key=lambda item: -item[1]))


def flops_per_token(model: ModelSpec, layout: Layout) -> float:
    weights = 2 * model.active_params  # forward; backward is twice that
    attention = 4 * model.num_layers * model.hidden_size * model.seq_length
    repeated = {"none": 0.0, "selective": attention, "full": weights + attention}
    return 3 * (weights + attention) + repeated[layout.recompute]


def step_time(model: ModelSpec, options: PlanOptions, cluster: Cluster, layout: Layout) -> StepTime:
    tp, pp, cp, dp, ep = layout.tp, layout.pp, layout.cp, layout.dp, layout.ep
    micro_batches = options.global_batch // (dp * options.micro_batch)
    tokens = options.global_batch * model.seq_length
    peak = cluster.peak_tflops * 1e12 * options.mfu
    compute = tokens * flops_per_token(model, layout) / (layout.gpus * peak) / micro_batches

    layers = model.num_layers // pp
    # A micro-batch's slice of activations on one GPU, in bytes: s/cp tokens of width h.
    activation = BF16 * (model.seq_length // cp) * options.micro_batch * model.hidden_size
    # Sequence-parallel TP: all-gather + reduce-scatter around attention and MLP, forward and
    # backward: four all-reduce volumes per layer (six with full recomputation).
    collectives = 6 if layout.recompute == "full" else 4
    tp_comm = layers * collectives * _all_reduce(activation, tp, _link(cluster, tp))
    # Ring attention passes the K and V chunks around the CP ring; the backward also returns
    # their gradients: about three KV volumes per layer.
    kv = activation * model.num_kv_heads * model.head_dim / model.hidden_size * 2 / tp
    cp_link = _link(cluster, tp * cp) * 1e9
    cp_comm = layers * 3 * kv * (cp - 1) / cp_link if cp > 1 else 0.0
    # MoE dispatch and combine, forward and backward: four all-to-alls of top_k token copies.
    routed = activation * model.moe_top_k / tp
    ep_link = _link(cluster, tp * cp * ep) * 1e9
    ep_comm = layers * 4 * routed * (ep - 1) / ep / ep_link if ep > 1 else 0.0
    # One activation forward and one gradient backward per stage boundary (sharded by TP);
    # each of the VP virtual stages has its own boundary.
    pp_link = cluster.inter_node_gbps if cluster.nodes > 1 else cluster.intra_node_gbps
    pp_comm = layout.vp * 2 * activation / tp / (pp_link * 1e9) if pp > 1 else 0.0

    slot = compute + tp_comm + cp_comm + ep_comm + pp_comm
    return StepTime(
        compute_s=micro_batches * compute,
        tp_comm_s=micro_batches * tp_comm,
        cp_comm_s=micro_batches * cp_comm,
        ep_comm_s=micro_batches * ep_comm,
        pp_comm_s=micro_batches * pp_comm,
        # (m + p - 1) slots instead of m: bubble (p-1)/(m+p-1); interleaving divides the idle
        # slots by VP (Narayanan et al. 2021 §2.2.2).
        bubble_s=(pp - 1) / layout.vp * slot,
        dp_comm_s=_gradient_reduction(model, options, cluster, layout),
    )


def _gradient_reduction(
    model: ModelSpec, options: PlanOptions, cluster: Cluster, layout: Layout
) -> float:
    """All-reduce of gradients (or reduce-scatter + all-gather of parameters with the
    distributed optimizer, the same volume in 2 + 4 instead of 2 × 4 bytes)."""
    tp, pp, cp, dp, ep = layout.tp, layout.pp, layout.cp, layout.dp, layout.ep
    layers = model.num_layers // pp
    dense = (layers * model.dense_params_per_layer + model.embedding_params) / tp
    experts = layers * model.expert_params_per_layer / (tp * ep)
    grad_bytes = 4 if options.grad_dtype == "fp32" else 2
    link = _link(cluster, tp * cp * dp)
    seconds = 0.0
    for params, ranks in ((dense, dp * cp), (experts, dp * cp // ep)):
        if ranks > 1 and params:
            if options.distributed_optimizer:
                volume = (ranks - 1) / ranks * params * (grad_bytes + BF16)
            else:
                volume = 2 * (ranks - 1) / ranks * params * grad_bytes
            seconds += volume / (link * 1e9)
    return seconds


def _all_reduce(size_bytes: float, ranks: int, gbps: float) -> float:
    """Ring all-reduce: each rank sends and receives 2(n-1)/n of the buffer."""
    return 2 * (ranks - 1) / ranks * size_bytes / (gbps * 1e9) if ranks > 1 else 0.0


def _link(cluster: Cluster, span: int) -> float:
    """Bandwidth (GB/s) of a group whose ranks spread over `span` consecutive GPUs."""
    return cluster.intra_node_gbps if span <= cluster.gpus_per_node else cluster.inter_node_gbps

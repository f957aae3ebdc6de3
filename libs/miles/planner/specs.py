"""What the planner is asked about: the cluster, the model, the workload; and a layout.

Parameter counts are derived from the shapes rather than taken as one number, because sharding
needs to know where the parameters sit (per layer, per expert, in the embeddings).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Recompute = Literal["none", "selective", "full"]
Mode = Literal["colocated", "split"]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Cluster(_Spec):
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(8, ge=1)
    gpu_memory_gib: float = Field(80.0, gt=0, description="Memory of one GPU, GiB.")
    peak_tflops: float = Field(989.0, gt=0, description="Dense bf16 peak of one GPU, TFLOP/s.")
    intra_node_gbps: float = Field(
        450.0, gt=0, description="Per-GPU bandwidth inside a node (NVLink), GB/s per direction."
    )
    inter_node_gbps: float = Field(
        50.0, gt=0, description="Per-GPU bandwidth between nodes (InfiniBand), GB/s."
    )

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


class ModelSpec(_Spec):
    name: str = "custom"
    num_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    num_attention_heads: int = Field(ge=1)
    num_kv_heads: int = Field(ge=1, description="Key/value heads (query groups under GQA).")
    ffn_hidden_size: int = Field(ge=1, description="Dense MLP width.")
    vocab_size: int = Field(ge=1)
    seq_length: int = Field(ge=1, description="Tokens per training sequence.")
    gated_mlp: bool = Field(True, description="SwiGLU (three MLP matrices) rather than GeLU.")
    tied_embeddings: bool = False
    dropout: bool = Field(False, description="Dropout masks are stored (GPT-3 style training).")
    num_experts: int = Field(0, ge=0, description="0 for a dense model.")
    moe_top_k: int = Field(0, ge=0, description="Experts each token is routed to.")
    moe_ffn_hidden_size: int = Field(0, ge=0, description="Width of one expert's MLP.")
    params_billion: float | None = Field(
        None,
        gt=0,
        description="Total parameters; None derives them from the shapes. When set, the "
        "derived counts are scaled to this total (biases and the like the shapes leave out).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError("num_attention_heads must be a multiple of num_kv_heads")
        if self.num_experts and not (0 < self.moe_top_k <= self.num_experts):
            raise ValueError("an MoE model needs 0 < moe_top_k <= num_experts")
        if self.num_experts and not self.moe_ffn_hidden_size:
            raise ValueError("an MoE model needs moe_ffn_hidden_size")
        return self

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def _scale(self) -> float:
        if self.params_billion is None:
            return 1.0
        return self.params_billion * 1e9 / self._derived_total()

    def _mlp(self, width: int) -> int:
        return (3 if self.gated_mlp else 2) * self.hidden_size * width

    def _derived_total(self) -> float:
        layers = self.num_layers * (self._dense_raw() + self.num_experts * self._mlp_expert_raw())
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
        return layers + embeddings

    def _dense_raw(self) -> int:
        """Attention, norms, router and (for a dense model) the MLP of one layer."""
        h, kv_dim = self.hidden_size, self.num_kv_heads * self.head_dim
        attention = 2 * h * h + 2 * h * kv_dim  # Q and output projections; K and V
        if self.is_moe:
            return attention + 2 * h + h * self.num_experts  # norms, router
        return attention + 2 * h + self._mlp(self.ffn_hidden_size)

    def _mlp_expert_raw(self) -> int:
        return self._mlp(self.moe_ffn_hidden_size) if self.is_moe else 0

    @property
    def dense_params_per_layer(self) -> float:
        """Parameters of one layer that every expert-parallel rank holds."""
        return self._dense_raw() * self._scale

    @property
    def expert_params_per_layer(self) -> float:
        """Parameters of all experts of one layer (0 for a dense model)."""
        return self.num_experts * self._mlp_expert_raw() * self._scale

    @property
    def embedding_params(self) -> float:
        """One vocabulary matrix: the input embedding, or the output layer."""
        return self.vocab_size * self.hidden_size * self._scale

    @property
    def total_params(self) -> float:
        return self._derived_total() * self._scale

    @property
    def active_params(self) -> float:
        """Parameters a token passes through: the FLOPs count uses these (6·N per token)."""
        routed = self.moe_top_k * self._mlp_expert_raw() * self._scale
        layers = self.num_layers * (self.dense_params_per_layer + routed)
        return layers + self.embedding_params * (1 if self.tied_embeddings else 2)


class PlanOptions(_Spec):
    global_batch: int = Field(128, ge=1, description="Sequences per optimizer step.")
    micro_batch: int = Field(1, ge=1, description="Sequences per forward/backward.")
    mfu: float = Field(0.4, gt=0, le=1, description="Assumed model FLOPs utilisation.")
    memory_headroom: float = Field(
        0.1, ge=0, lt=1, description="Share of GPU memory kept free (allocator, NCCL, CUDA)."
    )
    distributed_optimizer: bool = Field(
        True, description="Shard optimizer states across data-parallel ranks (Megatron)."
    )
    grad_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="Megatron accumulates and reduces bf16 models' grads in fp32."
    )
    flash_attention: bool = Field(
        True, description="Attention scores are never stored (FlashAttention)."
    )
    interleaved_pipeline: bool = Field(
        True, description="Allow Megatron's interleaved 1F1B schedule (virtual stages, VP)."
    )
    min_cp_chunk: int = Field(
        4096,
        ge=1,
        description="Context parallelism cuts a sequence into chunks of at least this many "
        "tokens; shorter chunks leave too little attention work to hide the KV exchange.",
    )
    mode: Mode = Field(
        "colocated",
        description="colocated: training and rollout take turns on all GPUs; "
        "split: rollout_fraction of the GPUs only generate, the rest only train.",
    )
    rollout_fraction: float = Field(0.5, gt=0, lt=1, description="Share of GPUs for rollout.")
    rollout_concurrency: int = Field(
        32, ge=1, description="Sequences one SGLang engine must hold in its KV cache at once."
    )
    rollout_seq_length: int | None = Field(
        None, ge=1, description="Prompt + response tokens per rollout sequence; None: seq_length."
    )
    rollout_memory_fraction: float = Field(
        0.85,
        gt=0,
        le=1,
        description="Share of GPU memory for weights + KV cache (SGLang's "
        "mem_fraction_static); the rest holds activations and CUDA graphs.",
    )


class Layout(_Spec):
    """One way to lay a training job out: TP·CP·DP·PP GPUs, EP carved out of DP; VP virtual
    stages per pipeline rank under the interleaved schedule."""

    tp: int
    pp: int
    cp: int
    dp: int
    ep: int = 1
    vp: int = 1
    recompute: Recompute = "none"

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def label(self) -> str:
        """E.g. ``TP4 PP8 VP5 CP2 DP1``; VP, CP and EP only when above 1."""
        parts = [f"TP{self.tp}", f"PP{self.pp}"]
        parts += [f"VP{self.vp}"] if self.vp > 1 else []
        parts += [f"CP{self.cp}"] if self.cp > 1 else []
        parts += [f"DP{self.dp}"]
        parts += [f"EP{self.ep}"] if self.ep > 1 else []
        return " ".join(parts)

"""Memory per GPU: weights, gradients, optimizer states and activations for training; weights and
KV cache for a rollout engine.

Static memory follows mixed-precision Adam (Rajbhandari et al. 2019, ZeRO, arXiv:1910.02054
§3.1): 2 bytes of bf16 weights, 2 or 4 bytes of gradients, and 12 bytes of fp32 master weights
and two moments per parameter. Megatron keeps bf16 models' gradients in fp32 (18 bytes/param);
its distributed optimizer shards the 12 optimizer bytes across data-parallel ranks, "6 + 12/d"
in Megatron-LM's docs/distrib_optimizer.md.

Activations follow Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models" (arXiv:2205.05198), §4.1 counted term by term so that GQA, SwiGLU and MoE
shapes fit; for a GPT layer it reduces to their equations (see ``layer_activation_bytes``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, computed_field

from miles.planner.specs import Layout, ModelSpec, PlanOptions, Recompute

GIB = 2**30
BF16 = 2
ADAM_STATE_BYTES = 12  # fp32 master weights, first and second moments


class MemoryBreakdown(BaseModel):
    """GiB per GPU on the most loaded pipeline stage."""

    model_config = ConfigDict(frozen=True)

    weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.gradients_gib + self.optimizer_gib + self.activations_gib


def layer_activation_bytes(
    model: ModelSpec,
    *,
    seq: int,
    micro_batch: int,
    tp: int = 1,
    sequence_parallel: bool = False,
    recompute: Recompute = "none",
    flash_attention: bool = False,
    cp: int = 1,
) -> float:
    """Bytes one transformer layer keeps for its backward pass, for one micro-batch.

    Korthikanti et al. §4.1 count for a GPT layer (16-bit activations, 1-byte dropout masks):
    attention 11sbh + 5as²b, MLP 19sbh, two layer norms 4sbh; in total sbh(34 + 5as/h).
    With tensor parallelism (§4.2.1) the norms, dropout masks and the inputs of the first
    linear of each block (10sbh) stay replicated: sbh(10 + 24/t + 5as/(ht)); sequence
    parallelism (§4.2.2) shards them too: sbh/t (34 + 5as/h). Selective recomputation (§5)
    drops the 5as²b of the attention core: 34sbh/t. Full recomputation keeps only the layer
    input, 2sbh (the paper's 2sbhL for L layers; sharded by t under sequence parallelism).
    """
    s, b, h = seq // cp, micro_batch, model.hidden_size
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh / (tp if sequence_parallel else 1)
    mask = 1 if model.dropout else 0
    # Replicated without sequence parallelism (the "10sbh"): the inputs of the two norms, of
    # the QKV projection and of the first MLP linear, and the dropout masks after each block.
    replicated = 4 * sbh + 2 * sbh + 2 * sbh + 2 * mask * sbh
    # Sharded by TP (the "24sbh"): Q, K and V for QK^T and AV (K and V are narrower under GQA),
    # the output-projection input; the MLP's activation-function input and output. GeLU keeps
    # 2 + 2 bytes per hidden unit (16sbh for f = 4h); SwiGLU keeps gate and up (4) and their
    # product (2). An MoE token is processed by top_k experts, whose inputs are copies too.
    kv_width = model.num_kv_heads * model.head_dim
    attention = 2 * sbh + 2 * 2 * s * b * kv_width + 2 * sbh
    if model.is_moe:
        mlp = (6 if model.gated_mlp else 4) * s * b * model.moe_ffn_hidden_size * model.moe_top_k
        mlp += 2 * sbh * model.moe_top_k
    else:
        mlp = (6 if model.gated_mlp else 4) * s * b * model.ffn_hidden_size
    # Attention core (the "5as²b"): softmax output 2, its dropout mask 1, dropout output 2.
    # FlashAttention never stores it; selective recomputation recomputes it.
    score_bytes = 0 if flash_attention or recompute == "selective" else (5 if mask else 2)
    scores = score_bytes * model.num_attention_heads * s * seq * b
    sharded = attention + mlp + scores
    if sequence_parallel:
        return (replicated + sharded) / tp
    return replicated + sharded / tp


def training_memory(model: ModelSpec, options: PlanOptions, layout: Layout) -> MemoryBreakdown:
    """The larger of the first and the last pipeline stage (they differ when PP > 1)."""
    first = _stage_memory(model, options, layout, stage=0)
    last = _stage_memory(model, options, layout, stage=layout.pp - 1)
    return max(first, last, key=lambda memory: memory.total_gib)


def _stage_memory(
    model: ModelSpec, options: PlanOptions, layout: Layout, stage: int
) -> MemoryBreakdown:
    tp, pp, cp, dp, ep = layout.tp, layout.pp, layout.cp, layout.dp, layout.ep
    layers = model.num_layers // pp
    dense = layers * model.dense_params_per_layer / tp
    experts = layers * model.expert_params_per_layer / (tp * ep)
    if stage == 0:
        dense += model.embedding_params / tp  # vocabulary-parallel input embedding
    if stage == pp - 1 and (pp > 1 or not model.tied_embeddings):
        dense += model.embedding_params / tp  # output layer (a copy when tied and PP > 1)
    params = dense + experts
    grad_bytes = 4 if options.grad_dtype == "fp32" else 2
    # Megatron's distributed optimizer shards over the data-parallel group including CP ranks;
    # expert parameters are replicated only over the DP·CP/EP ranks outside their EP group.
    dense_shards = dp * cp if options.distributed_optimizer else 1
    expert_shards = dp * cp // ep if options.distributed_optimizer else 1
    optimizer = ADAM_STATE_BYTES * (dense / dense_shards + experts / expert_shards)

    micro_batches = options.global_batch // (dp * options.micro_batch)
    # 1F1B: stage i holds activations of min(p - i, m) micro-batches (Narayanan et al. 2021,
    # arXiv:2104.04473 §2.2); so the first stage holds L layers' worth (Korthikanti §4.2.3).
    in_flight: float = min(pp - stage, micro_batches)
    if layout.vp > 1:  # interleaving: first stage holds 1 + (p-1)/(p·v) times more (§4.2.3)
        in_flight *= 1 + (pp - 1) / (pp * layout.vp)
    per_layer = _layer_bytes(model, options, layout, layout.recompute)
    activations = in_flight * layers * per_layer
    if layout.recompute == "full":  # the layer being recomputed holds its full activations
        activations += _layer_bytes(model, options, layout, "none")
    if stage == pp - 1:
        # Output layer and loss (Korthikanti's total-memory count): the final-norm and
        # output-layer inputs, 4sbh/t, and fp32 logits, 4sbv/t, large for 128k+ vocabularies.
        tokens = model.seq_length // cp * options.micro_batch
        activations += 4 * tokens * (model.hidden_size + model.vocab_size) / tp
    return MemoryBreakdown(
        weights_gib=BF16 * params / GIB,
        gradients_gib=grad_bytes * params / GIB,
        optimizer_gib=optimizer / GIB,
        activations_gib=activations / GIB,
    )


def _layer_bytes(
    model: ModelSpec, options: PlanOptions, layout: Layout, recompute: Recompute
) -> float:
    return layer_activation_bytes(
        model,
        seq=model.seq_length,
        micro_batch=options.micro_batch,
        tp=layout.tp,
        sequence_parallel=layout.tp > 1,  # always on with TP, as Korthikanti et al. recommend
        recompute=recompute,
        flash_attention=options.flash_attention,
        cp=layout.cp,
    )


class RolloutMemory(BaseModel):
    """GiB per GPU of one SGLang engine: bf16 weights and the KV cache for its target batch."""

    model_config = ConfigDict(frozen=True)

    weights_gib: float
    kv_cache_gib: float

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.kv_cache_gib


def rollout_memory(model: ModelSpec, options: PlanOptions, engine_tp: int) -> RolloutMemory:
    """KV cache: 2 (K and V) · layers · KV heads on this GPU · head_dim · 2 bytes per token.

    SGLang shards KV heads over TP and, when TP exceeds them, replicates each head on
    TP / num_kv_heads GPUs, so a GPU never holds less than one head.
    """
    kv_heads = max(1, model.num_kv_heads // engine_tp)
    per_token = 2 * model.num_layers * kv_heads * model.head_dim * BF16
    tokens = options.rollout_concurrency * (options.rollout_seq_length or model.seq_length)
    return RolloutMemory(
        weights_gib=BF16 * model.total_params / engine_tp / GIB,
        kv_cache_gib=per_token * tokens / GIB,
    )

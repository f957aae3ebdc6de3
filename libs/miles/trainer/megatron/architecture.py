"""The numbers of an HF Llama / Qwen2 checkpoint that decide its Megatron-core layout.

Both families are the same decoder (pre-norm RMSNorm, rotary embeddings in the rotate-half
layout, grouped-query attention, SwiGLU MLP, no biases) except that Qwen2 adds a bias to the
q, k and v projections. Anything else (rope scaling, sliding windows, Llama's optional o_proj and
MLP biases) would silently change the function the converted model computes, so it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


@dataclass(frozen=True)
class Architecture:
    model_type: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    """Key/value heads: ``num_key_value_heads`` in HF, ``num_query_groups`` in Megatron."""
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    qkv_bias: bool
    tied_embeddings: bool

    @classmethod
    def from_hf(cls, config: PretrainedConfig) -> Architecture:
        model_type = config.model_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise NotImplementedError(
                f"the Megatron backend converts {SUPPORTED_MODEL_TYPES}, not {model_type!r}"
            )
        if config.hidden_act != "silu":
            raise NotImplementedError(f"SwiGLU needs hidden_act='silu', not {config.hidden_act!r}")
        rope = config.rope_parameters  # transformers 5: {"rope_type": ..., "rope_theta": ...}
        if rope["rope_type"] != "default":
            raise NotImplementedError(f"rope_type {rope['rope_type']!r} is not converted")
        if model_type == "llama" and (config.attention_bias or config.mlp_bias):
            raise NotImplementedError("Llama with attention_bias or mlp_bias is not converted")
        if model_type == "qwen2" and config.use_sliding_window:
            raise NotImplementedError("Qwen2 with use_sliding_window is not converted")
        heads = config.num_attention_heads
        # Qwen2Config has no head_dim field; Qwen2's attention falls back to hidden / heads too.
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            model_type=model_type,
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            ffn_hidden_size=config.intermediate_size,
            num_attention_heads=heads,
            num_query_groups=config.num_key_value_heads,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
            max_position_embeddings=config.max_position_embeddings,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=float(rope["rope_theta"]),
            qkv_bias=model_type == "qwen2",
            tied_embeddings=bool(config.tie_word_embeddings),
        )

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def check_tensor_parallel(self, size: int) -> None:
        """Megatron splits heads, query groups, the FFN and the vocabulary evenly over ranks."""
        for what, count in (
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_query_groups),
            ("intermediate_size", self.ffn_hidden_size),
            ("vocab_size", self.vocab_size),
        ):
            if count % size:
                raise ValueError(f"{what}={count} is not divisible by tensor_parallel={size}")

"""A Megatron-core ``GPTModel`` equal to an HF Llama/Qwen2, for this rank's pipeline stage.

The layer spec is Transformer Engine's when ``transformer_engine`` imports and a GPU is present
(fused norm+linear, fused attention), else Megatron's local spec (plain PyTorch modules), which
is what runs on CPU. Weights are never initialised here: ``perform_initialization=False`` skips
Megatron's init and the caller loads the HF checkpoint into every parameter.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes
from megatron.core.transformer import TransformerConfig
from torch import nn

from miles.trainer.megatron import convert, cpu_shims
from miles.trainer.megatron.architecture import Architecture

_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class MegatronLayout:
    """How the ranks split the model: ``world_size = tensor * pipeline * data``."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    data_parallel: int = 1

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.data_parallel


def uses_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None and torch.cuda.is_available()


def transformer_config(arch: Architecture, layout: MegatronLayout) -> TransformerConfig:
    """Megatron's config for ``arch``, in fp32 with every CUDA-only fusion off."""
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,  # SwiGLU: silu(gate) * up
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        # The trainer's ratio pi_theta / pi_old is taken against an engine that samples without
        # dropout (TorchTrainer runs the HF model in eval mode for the same reason).
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=layout.tensor_parallel,
        pipeline_model_parallel_size=layout.pipeline_parallel,
        pipeline_dtype=torch.float32,
        # Micro-batches are trimmed to their own longest sample, so pipeline stages exchange
        # activation shapes before the activations.
        variable_seq_lengths=True,
        # Dense models have no MoE dispatcher, but the default ("allgather") refuses
        # variable_seq_lengths in TransformerConfig.__post_init__.
        moe_token_dispatcher_type="alltoall",
        # Our loss function applies its own token/sample shares; Megatron must not divide it by
        # the number of micro-batches (schedules.forward_step_calc_loss).
        calculate_per_token_loss=True,
        params_dtype=torch.float32,
        use_cpu_initialization=True,
        perform_initialization=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )


def build_gpt_model(arch: Architecture, layout: MegatronLayout) -> GPTModel:
    """This rank's stage of the model; ``parallel_state`` must be initialised first."""
    config = transformer_config(arch, layout)
    if uses_transformer_engine():
        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    first = parallel_state.is_pipeline_first_stage()
    last = parallel_state.is_pipeline_last_stage()
    with cpu_shims.tensor_cuda_is_noop():
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=arch.vocab_size,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=first,
            post_process=last,
            parallel_output=True,  # logits stay vocab-sharded; the loss is vocab-parallel
            share_embeddings_and_output_weights=arch.tied_embeddings,
            position_embedding_type="rope",
            rotary_base=arch.rope_theta,
        )
    _mark_tensor_parallel(model)
    return model


def _mark_tensor_parallel(model: GPTModel) -> None:
    """Set the ``tensor_model_parallel`` attributes Megatron's utilities read.

    Megatron sets them only inside its weight initialisation, which ``perform_initialization=False``
    skips (``tensor_parallel/layers.py``); without them ``param_is_not_tensor_parallel_duplicate``
    takes every weight for a replica and the grad norm counts only rank 0's shards.
    """
    for name, parameter in model.named_parameters():
        if hasattr(parameter, "tensor_model_parallel"):  # biases get them at construction
            continue
        dim = convert.partition_dim(name)
        set_tensor_model_parallel_attributes(
            parameter, is_parallel=dim is not None, dim=0 if dim is None else dim, stride=1
        )


def global_named_parameters(model: GPTModel) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` with layer indices made global (``layer_number`` is 1-based)."""
    named = []
    for name, parameter in model.named_parameters():
        match = _LOCAL_LAYER.match(name)
        if match is not None:
            layer = model.decoder.layers[int(match.group(1))].layer_number - 1
            name = f"decoder.layers.{layer}.{match.group(2)}"
        named.append((name, parameter))
    return named

"""HF Llama/Qwen2 tensors <-> Megatron-core GPTModel tensors, and their tensor-parallel shards.

Pure functions on CPU tensors, one Megatron parameter at a time, so a rank reads only the HF
tensors of its own pipeline stage. Megatron names here are *global*: ``decoder.layers.{i}`` is
layer ``i`` of the whole model, whatever stage holds it.

Layouts (Megatron-core 0.16, ``megatron/core/transformer/attention.py`` and ``mlp.py``):

* ``linear_qkv`` fuses q, k and v **grouped by key/value head**: for each of the ``g`` query groups
  its ``h / g`` query heads, then its key head, then its value head, each ``head_dim`` rows:
  ``[q_0 .. q_{h/g-1}, k, v]`` x ``g``. Tensor parallelism cuts this along rows into contiguous
  blocks of whole groups, so a rank owns ``g / tp`` complete groups.
* ``linear_fc1`` fuses SwiGLU's gate and up projections as ``[gate; up]`` (the GLU applies the
  activation to the first half). Each rank holds ``[gate_r; up_r]``: the shards of both halves,
  not a contiguous slice of the fused matrix.
* Column-parallel weights (qkv, fc1, word embeddings, output layer) split dim 0; row-parallel
  weights (``linear_proj``, ``linear_fc2``) split dim 1; norms are replicated.
* With the Transformer Engine spec the pre-attention and pre-MLP RMSNorms are fused into the next
  linear layer: ``linear_qkv.layer_norm_weight`` and ``linear_fc1.layer_norm_weight`` instead of
  ``input_layernorm.weight`` and ``pre_mlp_layernorm.weight``. Both spellings are understood.

Every conversion is a reshape, a slice or a concatenation, so HF -> Megatron -> HF is bitwise.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import Tensor

from miles.trainer.megatron.architecture import Architecture

HFGetter = Callable[[str], Tensor]
"""Returns one HF tensor by name (e.g. from ``safetensors.safe_open``)."""

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_GLOBAL_RENAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}

_COLUMN_PARALLEL = (
    "linear_qkv.weight",
    "linear_qkv.bias",
    "word_embeddings.weight",
    "output_layer.weight",
)
_ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")
_GLU = "linear_fc1.weight"


def to_megatron(name: str, hf: HFGetter, arch: Architecture) -> Tensor:
    """The full (unsharded) Megatron tensor ``name`` built from the HF checkpoint."""
    if name == "output_layer.weight" and arch.tied_embeddings:
        # The last pipeline stage's copy of the tied embedding (see LanguageModule).
        return hf("model.embed_tokens.weight")
    if name in _GLOBAL_RENAMES:
        return hf(_GLOBAL_RENAMES[name])
    layer, rest = _split_layer(name)
    prefix = f"model.layers.{layer}."
    if rest in _LAYER_RENAMES:
        return hf(prefix + _LAYER_RENAMES[rest])
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        q, k, v = (hf(f"{prefix}self_attn.{p}_proj.{kind}") for p in "qkv")
        return pack_qkv(q, k, v, arch)
    if rest == "mlp.linear_fc1.weight":
        return torch.cat([hf(prefix + "mlp.gate_proj.weight"), hf(prefix + "mlp.up_proj.weight")])
    raise KeyError(f"no HF counterpart for Megatron parameter {name!r}")


def to_hf(name: str, full: Tensor, arch: Architecture) -> dict[str, Tensor]:
    """The HF tensors held by the full Megatron tensor ``name``; ``{}`` for a tied duplicate."""
    if name == "output_layer.weight" and arch.tied_embeddings:
        return {}  # HF saves a tied lm_head once, as model.embed_tokens.weight
    if name in _GLOBAL_RENAMES:
        return {_GLOBAL_RENAMES[name]: full}
    layer, rest = _split_layer(name)
    prefix = f"model.layers.{layer}."
    if rest in _LAYER_RENAMES:
        return {prefix + _LAYER_RENAMES[rest]: full}
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        parts = unpack_qkv(full, arch)
        return {f"{prefix}self_attn.{p}_proj.{kind}": t for p, t in zip("qkv", parts, strict=True)}
    if rest == "mlp.linear_fc1.weight":
        gate, up = full.chunk(2)
        return {prefix + "mlp.gate_proj.weight": gate, prefix + "mlp.up_proj.weight": up}
    raise KeyError(f"no HF counterpart for Megatron parameter {name!r}")


def pack_qkv(q: Tensor, k: Tensor, v: Tensor, arch: Architecture) -> Tensor:
    """``[q; k; v]`` rows (or bias entries) regrouped per query group, Megatron's fused order."""
    groups, per_group, head_dim = arch.num_query_groups, arch.heads_per_group, arch.head_dim
    rest = q.shape[1:]  # (hidden,) for a weight, () for a bias
    q = q.reshape(groups, per_group * head_dim, *rest)
    k = k.reshape(groups, head_dim, *rest)
    v = v.reshape(groups, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest).contiguous()


def unpack_qkv(fused: Tensor, arch: Architecture) -> tuple[Tensor, Tensor, Tensor]:
    groups, per_group, head_dim = arch.num_query_groups, arch.heads_per_group, arch.head_dim
    rest = fused.shape[1:]
    grouped = fused.reshape(groups, (per_group + 2) * head_dim, *rest)
    q, k, v = grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)
    return (
        q.reshape(-1, *rest).contiguous(),
        k.reshape(-1, *rest).contiguous(),
        v.reshape(-1, *rest).contiguous(),
    )


def shard(name: str, full: Tensor, rank: int, size: int) -> Tensor:
    """Tensor-parallel rank ``rank``'s slice of the full Megatron tensor ``name``."""
    if name.endswith(_GLU):
        return torch.cat([half.chunk(size)[rank] for half in full.chunk(2)]).contiguous()
    dim = _partition_dim(name)
    if dim is None:
        return full
    return full.chunk(size, dim=dim)[rank].contiguous()


def unshard(name: str, shards: list[Tensor]) -> Tensor:
    """The full Megatron tensor from every tensor-parallel rank's slice, in rank order."""
    if name.endswith(_GLU):
        halves = [s.chunk(2) for s in shards]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
    dim = _partition_dim(name)
    if dim is None:
        return shards[0]
    return torch.cat(shards, dim=dim)


def is_replicated(name: str) -> bool:
    """Norm weights: every tensor-parallel rank holds the whole tensor."""
    return partition_dim(name) is None


def partition_dim(name: str) -> int | None:
    """The dimension tensor parallelism cuts ``name`` along; None when it is replicated."""
    if name.endswith(_GLU):
        return 0
    return _partition_dim(name)


def _partition_dim(name: str) -> int | None:
    if name.endswith(_COLUMN_PARALLEL):
        return 0
    if name.endswith(_ROW_PARALLEL):
        return 1
    return None


def _split_layer(name: str) -> tuple[int, str]:
    match = _LAYER.match(name)
    if match is None:
        raise KeyError(f"no HF counterpart for Megatron parameter {name!r}")
    return int(match.group(1)), match.group(2)

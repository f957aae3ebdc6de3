"""HF safetensors in and out of a tensor- and pipeline-parallel Megatron model.

In: every rank opens the checkpoint lazily (``safe_open``) and reads only the tensors of its own
stage, converts each to the full Megatron tensor and keeps its tensor-parallel slice, one file or
the shards of an index alike (``miles.shards.open_weights``).

Out: within each tensor-parallel group of data-parallel replica 0 the slices are all-gathered and
converted back to HF tensors; the stages' tensors are then gathered on global rank 0, which writes
them with HF names (``miles.shards``: shards of at most ``trainer.max_shard_bytes`` and an index)
and the HF ``config.json`` (what the engines load). The gather goes through rank 0's memory,
which is fine for the models this runs on a CPU; a GPU-sized model would have each stage write
its own shards instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from torch import Tensor, nn
from transformers import PretrainedConfig

from miles import shards
from miles.trainer.megatron import convert
from miles.trainer.megatron.architecture import Architecture
from miles.trainer.megatron.model import global_named_parameters


@torch.no_grad()
def load_hf_weights(model: GPTModel, directory: str | Path, arch: Architecture) -> None:
    """Overwrite this rank's parameters with their slices of the HF checkpoint in ``directory``."""
    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    with shards.open_weights(directory) as hf:
        for name, parameter in global_named_parameters(model):
            full = convert.to_megatron(name, hf, arch)
            parameter.copy_(convert.shard(name, full, rank, size))


@torch.no_grad()
def gather_hf_weights(
    model: GPTModel, arch: Architecture, select: Callable[[nn.Parameter], Tensor] = Tensor.detach
) -> dict[str, Tensor]:
    """Every HF tensor on global rank 0; ``{}`` on the other ranks. Collective over all ranks.

    ``select`` picks what to gather from each parameter: the weights, or (``lambda p: p.grad``)
    the gradients, which have the same layout.
    """
    local: dict[str, Tensor] = {}
    if parallel_state.get_data_parallel_rank() == 0:
        group = parallel_state.get_tensor_model_parallel_group()
        size = parallel_state.get_tensor_model_parallel_world_size()
        for name, parameter in global_named_parameters(model):
            tensor = select(parameter).contiguous()
            if size == 1 or convert.is_replicated(name):
                full = tensor.clone()
            else:
                shards = [torch.empty_like(tensor) for _ in range(size)]
                dist.all_gather(shards, tensor, group=group)
                full = convert.unshard(name, shards)
            local.update(convert.to_hf(name, full, arch))
        if parallel_state.get_tensor_model_parallel_rank() != 0:
            local = {}
    stages: list[dict[str, Tensor]] | None = (
        [{} for _ in range(dist.get_world_size())] if dist.get_rank() == 0 else None
    )
    dist.gather_object(local, stages, dst=0)
    return {name: t for stage in stages or [] for name, t in stage.items()}


def write_hf_weights(
    directory: str | Path,
    tensors: dict[str, Tensor],
    config: PretrainedConfig,
    max_shard_bytes: int,
) -> str:
    """``config.json`` and the weights (``miles.shards``); their digest. The safetensors files
    carry the metadata transformers writes, so they are byte-identical to ``save_pretrained``'s."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    return shards.write_weights(tensors.items(), directory, max_shard_bytes)

"""HF safetensors in and out of a tensor- and pipeline-parallel Megatron model.

In: every rank opens the checkpoint lazily (``safe_open``) and reads only the tensors of its own
stage, converts each to the full Megatron tensor and keeps its tensor-parallel slice. A sharded HF
checkpoint (``model.safetensors.index.json``) is read through its index.

Out: within each tensor-parallel group of data-parallel replica 0 the slices are all-gathered and
converted back to HF tensors; the stages' tensors are then gathered on global rank 0, which writes
one ``model.safetensors`` with HF names and the HF ``config.json`` (what the engines load).
The gather goes through rank 0's memory, which is fine for the models this runs on a CPU; a
GPU-sized model would write one safetensors shard per stage plus an index instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import PretrainedConfig

from miles.trainer.megatron import convert
from miles.trainer.megatron.architecture import Architecture
from miles.trainer.megatron.model import global_named_parameters

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@contextlib.contextmanager
def open_hf_tensors(directory: str | Path) -> Iterator[convert.HFGetter]:
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    else:
        weight_map = {}
    files = set(weight_map.values()) or {WEIGHTS_FILE}
    with contextlib.ExitStack() as stack:
        handles = {
            name: stack.enter_context(safe_open(directory / name, framework="pt")) for name in files
        }

        def get(name: str) -> Tensor:
            return handles[weight_map.get(name, WEIGHTS_FILE)].get_tensor(name)

        yield get


@torch.no_grad()
def load_hf_weights(model: GPTModel, directory: str | Path, arch: Architecture) -> None:
    """Overwrite this rank's parameters with their slices of the HF checkpoint in ``directory``."""
    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    with open_hf_tensors(directory) as hf:
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
    directory: str | Path, tensors: dict[str, Tensor], config: PretrainedConfig
) -> str:
    """``config.json`` and ``model.safetensors``; the sha256 hex digest of the latter."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    path = directory / WEIGHTS_FILE
    # The metadata transformers writes, so the file is byte-identical to save_pretrained's.
    save_file({name: t.contiguous() for name, t in tensors.items()}, path, {"format": "pt"})
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()

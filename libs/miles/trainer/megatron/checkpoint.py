"""Full training state through Megatron's distributed checkpointing, for an exact resume.

``dist_checkpointing.save`` writes each parameter once, as a global tensor cut into the ranks'
shards, so a run can resume under another tensor/pipeline/data layout. AdamW's moments get the
sharding of their parameter (``dist_checkpointing.optimizer``, as Megatron's ``FP32Optimizer``
does); its per-parameter ``step`` counts are equal, so one ``common_step`` is stored. The CPU RNG
state is a common (unsharded) entry, written by rank 0 and read by every rank.

Integrity: rank 0 writes ``state.sha256`` (``sha256sum`` format: one ``<digest>  <file>`` line
per checkpoint file) and ``save_state`` returns the sha256 of that one file, which is what the
trainer service records and checks (``BlobStore.get_dir(..., checked=STATE_FILE)``).
``load_state`` checks every file against it before loading.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    optim_state_to_sharding_state,
)
from megatron.core.models.gpt import GPTModel

STATE_FILE = "state.sha256"
"""The file whose sha256 stands for the whole checkpoint directory."""


def init_adamw_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's per-parameter state now, as its first ``step`` would.

    Zero moments and ``step = 0`` are exactly what ``torch.optim.AdamW`` creates lazily, so the
    first update is unchanged; having them from the start lets a checkpoint written before any
    step, and the sharded state dict for loading, have every key.
    """
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if not optimizer.state[parameter]:
                optimizer.state[parameter] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(parameter, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(parameter, memory_format=torch.preserve_format),
                }


def save_state(model: GPTModel, optimizer: torch.optim.Optimizer, directory: str | Path) -> str:
    directory = Path(directory)
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer), str(directory))
    dist.barrier()
    digest = [_write_file_digests(directory) if dist.get_rank() == 0 else ""]
    dist.broadcast_object_list(digest, src=0)
    return str(digest[0])


def load_state(model: GPTModel, optimizer: torch.optim.Optimizer, directory: str | Path) -> None:
    directory = Path(directory)
    problem = [_check_file_digests(directory) if dist.get_rank() == 0 else ""]
    dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        raise ValueError(f"{directory}: {problem[0]}")
    loaded = dist_checkpointing.load(_sharded_state(model, optimizer), str(directory))
    model.load_state_dict(loaded["model"])
    optimizer_state = loaded["optimizer"]
    step = optimizer_state["state"].pop("common_step")
    for state in optimizer_state["state"].values():
        state["step"] = step.clone()
    optimizer.load_state_dict(optimizer_state)
    torch.set_rng_state(loaded["torch_rng"])


def _sharded_state(model: GPTModel, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    model_state = model.sharded_state_dict()
    return {
        "model": model_state,
        "optimizer": _optimizer_sharded_state(model_state, optimizer),
        "torch_rng": torch.get_rng_state(),
    }


def _optimizer_sharded_state(
    model_state: dict[str, Any], optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    state = optimizer.state_dict()
    steps = {float(entry["step"]) for entry in state["state"].values()}
    if len(steps) != 1:
        raise ValueError(f"AdamW parameters disagree on the step count: {sorted(steps)}")
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    id_to_sharded = get_param_id_to_sharded_param_map(model_state, parameters)
    optim_state_to_sharding_state(state, id_to_sharded, exclude_keys=("step",))
    state["state"]["common_step"] = torch.tensor(steps.pop())
    return state


def _file_digests(directory: Path) -> str:
    lines = []
    for path in sorted(p for p in directory.iterdir() if p.is_file() and p.name != STATE_FILE):
        with open(path, "rb") as handle:
            lines.append(f"{hashlib.file_digest(handle, 'sha256').hexdigest()}  {path.name}\n")
    return "".join(lines)


def _write_file_digests(directory: Path) -> str:
    listing = _file_digests(directory).encode()
    (directory / STATE_FILE).write_bytes(listing)
    return hashlib.sha256(listing).hexdigest()


def _check_file_digests(directory: Path) -> str:
    """``""`` when every file matches ``STATE_FILE``, else what does not."""
    expected = (directory / STATE_FILE).read_text()
    if _file_digests(directory) != expected:
        return f"checkpoint files do not match {STATE_FILE}"
    return ""

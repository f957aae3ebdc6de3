"""One FSDP rank: a ``TorchTrainer`` whose model is sharded, with checkpoints that reshard.

The step is ``TorchTrainer``'s own (``miles.trainer.fsdp.parallel`` gives it this rank's
samples and the sums over ranks). What differs is everything that reads or writes whole tensors:

- weights: the full state dict is gathered (``get_model_state_dict(full_state_dict=True,
  cpu_offload=True)``, a collective) and rank 0 writes the HF directory; every rank reads it back
  itself (one shared filesystem, as for Megatron's ranks);
- state: the AdamW moments go through torch's distributed checkpoint (DCP), each rank writing its
  shards plus one ``.metadata``, so N ranks can load what M ranks saved (DCP reshards on load).
  ``STATE_FILE`` lists the sha256 of every file DCP wrote, so the one digest the blob store checks
  covers all of them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, cast

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh

from miles import shards
from miles.config import Algorithm, TrainerConfig
from miles.events import TrainSample
from miles.trainer.fsdp.parallel import DataParallel
from miles.trainer.hf_weights import save_hf_weights
from miles.trainer.protocol import StepMetrics
from miles.trainer.torch_backend import TorchTrainer

STATE_FILE = "fsdp_state.json"
"""The digests of the DCP files of a ``save_state`` directory, and rank 0's RNG."""

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def initialize(rank: int, world_size: int, init_method: str, device: str) -> None:
    """Join the default process group: gloo on CPU, NCCL on GPUs."""
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)


class FsdpTrainer:
    """The ``TrainerBackend`` half of one rank; every call is a collective over all ranks."""

    state_file = STATE_FILE

    def __init__(
        self,
        model_path: str,
        trainer: TrainerConfig,
        algorithm: Algorithm,
        seed: int,
        trust_remote_code: bool = False,
    ) -> None:
        mesh = init_device_mesh(trainer.device, (dist.get_world_size(),))
        self.rank = dist.get_rank()
        self.torch = TorchTrainer(
            model_path,
            trainer,
            algorithm,
            seed,
            trust_remote_code=trust_remote_code,
            parallel=DataParallel(mesh),
        )

    def train_step(self, samples: list[TrainSample]) -> StepMetrics:
        return self.torch.train_step(samples)

    def scale_learning_rate(self, factor: float) -> None:
        self.torch.scale_learning_rate(factor)

    def save_weights(self, directory: str) -> str:
        """Gathered on every rank (a collective), written by rank 0; its digest on every rank."""
        full = get_model_state_dict(self.torch.model, options=FULL)
        if self.rank == 0:
            # A tied head is one parameter under two names; the files hold it once.
            model = self.torch.model
            kept = {name for name, _ in model.named_parameters()}
            kept |= {name for name, _ in model.named_buffers()}
            # Every value of a model's full state dict is a tensor.
            tensors = {name: cast(Tensor, value) for name, value in full.items() if name in kept}
            save_hf_weights(model, tensors, directory, self.torch.trainer.max_shard_bytes)
        dist.barrier()
        return shards.weights_digest(Path(directory))

    def load_weights(self, directory: str) -> None:
        """Every rank reads the whole weights and keeps its shards (a tied head is missing from
        the files and shares the embedding's parameter, hence ``strict=False``)."""
        full: dict[str, Any] = dict(shards.read_weights(directory))
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.torch.model, full, options=options)

    def named_tensors(self) -> dict[str, Tensor]:
        # Every value of a model's full state dict is a tensor.
        return cast(dict[str, Tensor], get_model_state_dict(self.torch.model, options=FULL))

    def save_state(self, directory: str) -> str:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        optimizer = get_optimizer_state_dict(self.torch.model, self.torch.optimizer)
        dcp.save({"optimizer": optimizer}, checkpoint_id=str(path / "dcp"))
        dist.barrier()
        if self.rank == 0:
            digests = {file.name: _sha256(file) for file in sorted((path / "dcp").iterdir())}
            state = {"dcp": digests, "torch_rng": self.rng_state()}
            (path / STATE_FILE).write_text(json.dumps(state, indent=1))
        dist.barrier()
        return _sha256(path / STATE_FILE)

    def load_state(self, directory: str) -> None:
        path = Path(directory)
        optimizer = get_optimizer_state_dict(self.torch.model, self.torch.optimizer)
        state = {"optimizer": optimizer}
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        set_optimizer_state_dict(self.torch.model, self.torch.optimizer, state["optimizer"])
        self.set_rng_state(json.loads((path / STATE_FILE).read_text())["torch_rng"])

    def rng_state(self) -> str:
        return self.torch.rng_state()

    def set_rng_state(self, encoded: str) -> None:
        self.torch.set_rng_state(encoded)

    def close(self) -> None:
        dist.destroy_process_group()


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()

"""Data parallelism for ``TorchTrainer``: this rank's share of a batch, and the sums over ranks.

FSDP2 (``torch.distributed.fsdp.fully_shard``, Zhao et al. 2023, arXiv:2304.11277) shards every
decoder layer's parameters, gradients and AdamW moments over the ranks; each rank runs the
forward and backward of its own samples, and the backward's reduce-scatter combines the
gradients. To give the single-process step, the combination must be a sum of gradients each
normalised by the *whole* mini-batch: every micro-batch keeps the weight
``miles.algo.share(..., batch totals)`` it has in one process (the rank sees the whole batch,
so it knows the global token and sample counts without a collective), and the reduce-scatter
divides by 1 instead of FSDP's default world size. The metrics' weighted sums are all-reduced
the same way (a maximum by ``max``).

FSDP's collectives need every rank to run the same number of forwards and backwards; a rank with
fewer micro-batches than the others runs a padding one with weight 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from miles.trainer.batch import TensorBatch, split
from miles.trainer.objective import MAX_METRICS, METRICS


class DataParallel:
    """One rank of ``world_size`` in the default process group over ``mesh``."""

    def __init__(self, mesh: DeviceMesh) -> None:
        self.mesh = mesh
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def shard(self, model: nn.Module) -> None:
        """``fully_shard`` each decoder layer, then the root (embeddings, norm, head: a tied
        head stays with its embedding), in place; the optimizer is built after this."""
        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=self.mesh)
        fully_shard(model, mesh=self.mesh)
        for module in model.modules():  # each FSDP module reduces its own parameter group
            if isinstance(module, FSDPModule):
                # Each rank's gradient is already its share of the batch mean: sum, do not
                # average. A plain SUM (no PREMUL_SUM or AVG op), which gloo has too.
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)

    def micro_batches(self, batch: TensorBatch, size: int) -> list[tuple[TensorBatch, float]]:
        """This rank's micro-batches of ``batch`` (samples ``rank, rank + world, ...``) with the
        weight factor 1, padded to every rank's count by copies of sample 0 with factor 0."""
        count = max(
            -(-len(range(rank, batch.num_samples, self.world_size)) // size)
            for rank in range(self.world_size)
        )
        local = batch.rows(slice(self.rank, None, self.world_size))
        own = split(local, size) if local.num_samples else []
        padding = split(batch.rows(slice(0, 1)), 1)[0]
        return [(micro, 1.0) for micro in own] + [(padding, 0.0)] * (count - len(own))

    def combine(self, totals: list[float]) -> list[float]:
        """The batch's ``METRICS`` from every rank's weighted sums (maxima by ``max``)."""
        summed = torch.tensor(totals, dtype=torch.float64)
        maxima = summed.clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        return [
            float(maxima[i] if name in MAX_METRICS else summed[i]) for i, name in enumerate(METRICS)
        ]


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The HF causal LM's repeated blocks (``model.model.layers`` in Llama, Qwen, Mistral)."""
    layers = model.get_submodule("model.layers")
    assert isinstance(layers, nn.ModuleList), f"{type(model).__name__} has no model.layers"
    return list(layers)

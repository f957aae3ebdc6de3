"""Process groups, gradient reduction and clipping for the Megatron backend on gloo.

Megatron's own ``DistributedDataParallel`` and ``clip_grad_norm_fp32`` keep their buffers on the
GPU (see ``cpu_shims``), so the two reductions a step needs are written here against
``parallel_state``'s groups:

* gradients are **summed** over the data-parallel group: each rank's loss is already weighted by
  its share of the whole batch, so the sum is the full-batch gradient (an average would divide
  it by the data-parallel size a second time);
* with pipeline parallelism and tied embeddings, the first stage's word embedding and the last
  stage's output layer are two copies of one matrix, so their gradients are summed over the
  embedding group (Megatron's ``finalize_model_grads`` does the same on the GPU);
* the global norm counts each parameter once: tensor-parallel shards on every rank, replicated
  parameters (norms) on tensor-parallel rank 0 only, the last stage's tied copy not at all.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from miles.trainer.megatron import cpu_shims
from miles.trainer.megatron.model import MegatronLayout


def initialize(rank: int, layout: MegatronLayout, init_method: str, seed: int) -> None:
    """Join the gloo process group and build Megatron's tensor/pipeline/data-parallel groups."""
    cpu_shims.install()
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=layout.world_size
    )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_parallel,
        pipeline_model_parallel_size=layout.pipeline_parallel,
        # The default group is gloo already; a second set of gloo groups would only cost time.
        create_gloo_process_groups=False,
    )
    cpu_shims.seed_rng_tracker(seed)


def shutdown() -> None:
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def reduce_gradients(model: nn.Module, tied_embedding: Tensor | None) -> None:
    """Sum the tied-embedding copies' gradients, then every gradient over data parallelism."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    for parameter in parameters:
        if parameter.grad is None:  # a stage-local parameter no micro-batch reached
            parameter.grad = torch.zeros_like(parameter)
    if tied_embedding is not None and parallel_state.is_rank_in_embedding_group():
        assert tied_embedding.grad is not None
        dist.all_reduce(tied_embedding.grad, group=parallel_state.get_embedding_group())
    if parallel_state.get_data_parallel_world_size() > 1:
        grads = [p.grad for p in parameters if p.grad is not None]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=parallel_state.get_data_parallel_group())
        for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(reduced)


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Scale gradients so their global L2 norm is at most ``max_norm``; return the norm before.

    The same rule as ``torch.nn.utils.clip_grad_norm_``: ``coef = min(1, max / (norm + 1e-6))``.
    """
    squares = torch.zeros((), dtype=torch.float64)
    grads = []
    for parameter in model.parameters():
        if parameter.grad is None:
            continue
        grads.append(parameter.grad)
        counted = param_is_not_tensor_parallel_duplicate(parameter) and not getattr(
            parameter,
            "shared",
            False,  # Megatron marks the last stage's tied copy this way
        )
        if counted:
            squares += parameter.grad.double().pow(2).sum()
    dist.all_reduce(squares, group=parallel_state.get_model_parallel_group())
    norm = squares.sqrt().item()
    coef = min(1.0, max_norm / (norm + 1e-6))
    if coef < 1.0:
        torch._foreach_mul_(grads, coef)
    return norm

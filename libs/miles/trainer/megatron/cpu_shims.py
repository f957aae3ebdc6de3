"""What it takes to run Megatron-core 0.16 on a CPU-only torch over gloo, in one place.

Megatron-core assumes a GPU in a handful of spots on the paths the trainer uses. Each patch below
was checked against the installed source (``megatron/core``), is installed by ``install()`` and
removed by ``uninstall()`` (or scoped by ``installed()``), and does nothing on a machine with CUDA,
where ``install()`` leaves torch alone.

Patched while installed:

1. ``torch.cuda.current_device()`` returns ``torch.device("cpu")``. Megatron allocates with
   ``device=torch.cuda.current_device()`` in RoPE (``RotaryEmbedding.get_emb`` moves
   ``inv_freq`` there on the first forward), in the tensor-parallel gather/scatter buffers
   (``tensor_parallel/mappings.py``) and the global memory buffer (``utils.GlobalMemoryBuffer``),
   in the pipeline's p2p receive buffers (``pipeline_parallel/p2p_communication.py``) and in
   ``dist_checkpointing``'s failure broadcast (``strategies/state_dict_saver.py``). A CPU build
   of torch raises there ("Torch not compiled with CUDA enabled").
2. ``torch.cuda.synchronize()`` is a no-op: ``dist_checkpointing.save`` calls it before
   writing (``strategies/filesystem_async.py``, ``preload_tensors``), and the pipeline's shape
   exchange (``P2PCommunicator._communicate_shapes``, used because micro-batches have variable
   lengths) calls it unconditionally. CPU work is done once a call or ``wait()`` returns.
3. ``pipeline_parallel.schedules.torch`` is a view of ``torch`` whose ``zeros`` maps
   ``device="cuda"`` to the CPU: the three schedules allocate their token counter with
   ``torch.zeros([], dtype=torch.int, device="cuda")``, which cannot be reached through (1).
   Only that module's name ``torch`` is rebound; torch itself is untouched.

Scoped to one call (``tensor_cuda_is_noop``):

4. ``torch.Tensor.cuda`` returns the tensor itself while a ``GPTModel`` is built: with pipeline
   parallelism and tied embeddings, ``LanguageModule.setup_embeddings_and_output_layer`` moves
   the last stage's copy of the embedding to the GPU (``weight.data.cuda()``) before summing it
   with the first stage's copy.

Not patched, handled by configuration instead:

* Megatron's CUDA RNG tracker: ``seed_rng_tracker`` calls ``model_parallel_cuda_manual_seed(seed,
  inference_rng_tracker=True, force_reset_rng=True)``, whose tracker makes ``fork()`` a null
  context and ``add()`` a no-op, so nothing reads or writes a CUDA generator. This is sound
  because the trainer runs without dropout; the CPU generator (``torch.manual_seed``) is the only
  RNG state, and it is what ``rng_state``/``save_state`` carry.
* The default causal mask (``transformer/utils.get_default_causal_mask``) is built on
  ``device="cuda"``; the trainer always passes an explicit causal mask instead.
* Megatron's optimizer wrappers (``FP32Optimizer``, ``clip_grads``, the distributed optimizer)
  allocate on ``device="cuda"``: the backend uses ``torch.optim.AdamW`` with its own grad-norm
  clipping over the model-parallel group, and shards AdamW's moments for ``dist_checkpointing``
  with ``dist_checkpointing.optimizer`` helpers, as ``FP32Optimizer`` does.
* ``DistributedDataParallel`` (the Megatron wrapper) keeps gradients in CUDA buffers: data
  parallelism is a plain all-reduce of the gradients over the data-parallel group.
* CUDA-only fusions (bias-activation, softmax, RoPE, layer norm persistence, gradient-accumulation
  fusion) are switched off in ``TransformerConfig``.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from megatron.core import tensor_parallel
from megatron.core.pipeline_parallel import schedules

_CPU = torch.device("cpu")
_originals: dict[str, Any] = {}


def install() -> None:
    """Patch (1)-(3); idempotent. A no-op where CUDA is available."""
    if _originals or torch.cuda.is_available():
        return
    _originals["current_device"] = torch.cuda.current_device
    _originals["synchronize"] = torch.cuda.synchronize
    _originals["schedules.torch"] = schedules.torch
    torch.cuda.current_device = _current_device  # type: ignore[assignment]
    torch.cuda.synchronize = _synchronize
    schedules.torch = _torch_with_cpu_zeros()


def uninstall() -> None:
    if not _originals:
        return
    torch.cuda.current_device = _originals.pop("current_device")
    torch.cuda.synchronize = _originals.pop("synchronize")
    schedules.torch = _originals.pop("schedules.torch")


@contextlib.contextmanager
def installed() -> Iterator[None]:
    install()
    try:
        yield
    finally:
        uninstall()


@contextlib.contextmanager
def tensor_cuda_is_noop() -> Iterator[None]:
    """Patch (4) for the duration of the block; a no-op where CUDA is available."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = _identity  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


def seed_rng_tracker(seed: int) -> None:
    """Megatron's model-parallel RNG tracker without CUDA generators (see the module docstring)."""
    tensor_parallel.model_parallel_cuda_manual_seed(
        seed, inference_rng_tracker=True, force_reset_rng=True
    )


def _current_device() -> torch.device:
    return _CPU


def _synchronize(device: Any = None) -> None:
    return None


def _identity(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return self


def _torch_with_cpu_zeros() -> types.ModuleType:
    view = types.ModuleType("torch")
    view.__dict__.update(torch.__dict__)
    zeros: Callable[..., torch.Tensor] = torch.zeros

    def cpu_zeros(*size: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        if device == "cuda":
            device = _CPU
        return zeros(*size, device=device, **kwargs)

    view.zeros = cpu_zeros  # type: ignore[attr-defined]
    return view

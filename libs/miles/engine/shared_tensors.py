"""Tensors handed to an engine on the same machine by handle, not by value:
``rollout.weight_sync = "tensor"`` and SGLang's ``/update_weights_from_tensor``.

The payload is SGLang's ``MultiprocessingSerializer`` format: ``multiprocessing``'s
``ForkingPickler`` over a list of ``(name, tensor)`` pairs, with the reductions
``torch.multiprocessing`` registers. For a CUDA tensor the pickle holds a CUDA IPC handle (the
engine maps the trainer's GPU memory: nothing is copied); for a CPU tensor, with the
``file_system`` sharing strategy, the name of a shared-memory segment under ``/dev/shm``. So
the path works only for a trainer and engine on the same node, which is what "colocated" means.
CPU weights then live in ``/dev/shm``, which needs room for them (a container's default is
often 64 MB: ``docker run --shm-size``).

A pickle is code. Loading one here goes through an unpickler that resolves only the handful of
torch rebuild functions and types this format needs; anything else (a pickle built by hand to
run ``os.system``) is refused by name before it is constructed.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing

_ALLOWED = {
    "torch.multiprocessing.reductions": {
        "rebuild_tensor",
        "rebuild_typed_storage",
        "rebuild_typed_storage_child",
        "rebuild_storage_filename",
        "rebuild_storage_empty",
        "rebuild_cuda_tensor",
    },
    "torch.storage": {"UntypedStorage", "TypedStorage"},
    "torch": {"Tensor", "Size"},
}
"""What a serialized list of (name, tensor) pairs may name, module -> attributes; plus dtypes."""


class UnsafePayload(pickle.UnpicklingError):
    """The payload names something other than torch's tensor rebuild functions."""


class _TensorsOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "multiprocessing.resource_sharer" or name == "rebuild_storage_fd":
            raise UnsafePayload(
                "the tensors were shared by file descriptor, which only a child process can "
                "receive: the sender must use torch.multiprocessing's 'file_system' strategy"
            )
        raise UnsafePayload(f"refusing to load {module}.{name}: only tensors may be sent")


def serialize_named_tensors(named: Mapping[str, torch.Tensor]) -> bytes:
    """``named`` as handles another process on this machine can map.

    A CPU tensor's storage moves into shared memory the first time (the tensor keeps working,
    now backed by ``/dev/shm``), so later calls on the same parameters copy nothing. The caller
    must keep the tensors alive and unchanged until the receiver has loaded them.
    """
    if any(not t.is_cuda for t in named.values()):
        # The default 'file_descriptor' strategy passes fds over a socket that only a child
        # of this process can connect to; a named segment can be opened by any local process.
        torch.multiprocessing.set_sharing_strategy("file_system")
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump([(name, tensor.detach()) for name, tensor in named.items()])
    return buffer.getvalue()


def load_named_tensors(payload: bytes) -> list[tuple[str, torch.Tensor]]:
    """The pairs a ``serialize_named_tensors`` payload names, mapped from the sender's memory.

    Raises ``UnsafePayload`` for anything but tensors, ``pickle.UnpicklingError`` (or
    ``RuntimeError`` from torch, when a segment is gone) for a payload that cannot be loaded.
    """
    loaded = _TensorsOnly(io.BytesIO(payload)).load()
    if not isinstance(loaded, list) or not all(
        isinstance(pair, tuple)
        and len(pair) == 2
        and isinstance(pair[0], str)
        and isinstance(pair[1], torch.Tensor)
        for pair in loaded
    ):
        raise UnsafePayload("the payload is not a list of (name, tensor) pairs")
    return loaded

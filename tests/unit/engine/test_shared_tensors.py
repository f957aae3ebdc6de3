"""Tensors by handle between two processes on one machine, and a pickle that is not tensors."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import pytest
import torch

from miles.engine.shared_tensors import (
    UnsafePayload,
    load_named_tensors,
    serialize_named_tensors,
)

RECEIVER = """
import sys, torch
from miles.engine.shared_tensors import load_named_tensors
pairs = load_named_tensors(sys.stdin.buffer.read())
for name, tensor in pairs:
    print(name, tensor.dtype, list(tensor.shape), float(tensor.double().sum()))
"""


def test_another_process_maps_the_tensors_without_copying_them_over_the_pipe() -> None:
    weight = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    named = {"w": weight, "b": torch.full((4,), 0.5, dtype=torch.bfloat16)}
    payload = serialize_named_tensors(named)
    # Handles, not values: a 4 MB tensor costs the payload no more than a small one.
    big = serialize_named_tensors({"w": torch.zeros(1 << 20)})
    assert len(big) < 2048, len(big)
    got = subprocess.run(
        [sys.executable, "-c", RECEIVER], input=payload, capture_output=True, check=True
    )
    assert got.stdout.decode().splitlines() == [
        "w torch.float32 [2, 3] 15.0",
        "b torch.bfloat16 [4] 2.0",
    ]
    # The sender's tensor still works, now backed by shared memory.
    assert weight.is_shared() and weight.sum().item() == 15.0


def test_a_tensor_in_this_process_round_trips() -> None:
    named = {"x": torch.randn(3, 5)}
    [(name, tensor)] = load_named_tensors(serialize_named_tensors(named))
    assert name == "x" and torch.equal(tensor, named["x"])


class _RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_before_it_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    payload = pickle.dumps([("w", _RunsACommand(marker))])
    with pytest.raises(UnsafePayload, match=r"refusing to load (posix|os)\.system"):
        load_named_tensors(payload)
    assert not marker.exists()


def test_a_payload_of_other_values_is_refused() -> None:
    with pytest.raises(UnsafePayload, match=r"list of \(name, tensor\) pairs"):
        load_named_tensors(pickle.dumps([("w", 1.0)]))
    with pytest.raises(UnsafePayload, match=r"refusing to load builtins\.eval"):
        load_named_tensors(b"cbuiltins\neval\n(S'1'\ntR.")


def test_file_descriptor_handles_get_a_hint() -> None:
    """The default strategy's handles reach only a child process: say which strategy works."""
    torch.multiprocessing.set_sharing_strategy("file_descriptor")
    try:
        buffer = io.BytesIO()
        ForkingPickler(buffer).dump([("w", torch.ones(2))])
    finally:
        torch.multiprocessing.set_sharing_strategy("file_system")
    with pytest.raises(UnsafePayload, match="'file_system' strategy"):
        load_named_tensors(buffer.getvalue())

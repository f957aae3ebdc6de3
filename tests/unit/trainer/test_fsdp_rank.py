"""One FSDP rank in this process (a gloo group of one): the sharded model takes exactly the
``TorchTrainer`` step, and its weights and DCP state go out and come back. The two-rank cases,
resharding included, are tests/integration/test_fsdp.py."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from miles.trainer import TorchTrainer
from miles.trainer.fsdp import rank as fsdp_rank
from tests.contract.test_trainer_backend import GRPO, SEED, TRAINER, make_samples


@pytest.fixture
def process_group() -> Iterator[None]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fsdp_rank.initialize(0, 1, f"tcp://127.0.0.1:{port}", "cpu")
    yield
    torch.distributed.destroy_process_group()


def saved(
    backend: TorchTrainer | fsdp_rank.FsdpTrainer, directory: Path
) -> dict[str, torch.Tensor]:
    backend.save_weights(str(directory))
    return load_file(directory / "model.safetensors")


def test_one_rank_takes_the_torch_step_and_resumes_bit_for_bit(
    process_group: None, model_dir: str, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    single = TorchTrainer(model_dir, TRAINER, GRPO, SEED)
    rank = fsdp_rank.FsdpTrainer(model_dir, TRAINER, GRPO, SEED)
    samples = make_samples(1, count=7)

    assert rank.train_step(samples).loss == single.train_step(samples).loss
    after = saved(rank, tmp_path / "rank")
    reference = saved(single, tmp_path / "single")
    assert all(torch.equal(after[name], reference[name]) for name in reference)
    assert all(torch.equal(rank.named_tensors()[name], after[name]) for name in after)

    rank.save_state(str(tmp_path / "state"))
    rng = rank.rng_state()
    expected = rank.train_step(make_samples(2))
    rank.load_weights(str(tmp_path / "rank"))
    rank.load_state(str(tmp_path / "state"))
    rank.set_rng_state(rng)
    assert rank.train_step(make_samples(2)).loss == expected.loss

"""StepMetrics: named fields for what the service reads, the plain mapping the manifest stores."""

from __future__ import annotations

import pickle

import pytest
import torch

from miles.trainer import StepMetrics

BUILT_IN = {
    "loss": 0.5,
    "kl": 0.01,
    "clip_frac": 0.1,
    "ratio_mean": 1.0,
    "engine_gap": 0.02,
    "grad_norm": 3.0,
    "tokens": 15.0,
    "seconds_forward_backward": 0.2,
    "seconds_optimizer": 0.05,
}


def test_a_built_in_step_reads_by_name_and_as_the_same_mapping() -> None:
    metrics = StepMetrics.from_mapping(BUILT_IN)
    assert (metrics.loss, metrics.grad_norm, metrics.tokens) == (0.5, 3.0, 15.0)
    assert metrics == BUILT_IN
    assert list(metrics) == list(BUILT_IN)  # the manifest keeps the order it always had
    assert metrics.to_dict() == BUILT_IN and type(metrics.to_dict()) is dict
    assert metrics["clip_frac"] == 0.1 and len(metrics) == len(BUILT_IN)


def test_a_custom_update_keeps_exactly_what_it_reported() -> None:
    metrics = StepMetrics.from_mapping({"loss": torch.tensor(0.25), "accuracy": 1})
    assert metrics.to_dict() == {"loss": 0.25, "accuracy": 1.0}
    assert metrics.grad_norm is None and "grad_norm" not in metrics
    assert metrics.get("kl", 0.0) == 0.0
    assert metrics.extra == {"accuracy": 1.0}
    with pytest.raises(KeyError):
        metrics["grad_norm"]


def test_a_step_without_a_loss_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="must report its 'loss'; it reported \\['accuracy'\\]"):
        StepMetrics.from_mapping({"accuracy": 1.0})


def test_the_actor_adds_its_cpu_seconds_and_the_carrier_crosses_processes() -> None:
    metrics = StepMetrics.from_mapping(BUILT_IN).with_cpu_seconds(0.4)
    assert metrics.to_dict() == {**BUILT_IN, "cpu_seconds": 0.4}
    assert pickle.loads(pickle.dumps(metrics)) == metrics  # Ray and the spawned ranks pickle it

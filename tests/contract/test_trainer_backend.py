"""The trainer-backend contract: one suite, run against every ``TrainerBackend``.

"torch" is ``TorchTrainer`` in this process (seconds); "megatron" is ``MegatronRayGroup``, two
tensor-parallel Megatron-core rank actors on Ray, on CPU over gloo (``cpu_shims``): an
integration test, as tests/integration/test_megatron.py; "fsdp" is ``FsdpRayGroup``, two FSDP2
rank actors over gloo (an integration test too); "torch-lora" is ``TorchTrainer`` with
``trainer.lora`` (adapters train, merged weights go out); "torch-sharded" is ``TorchTrainer``
whose ``trainer.max_shard_bytes`` splits the weights into several shards and an index. All train
the session's tiny Llama, but "simulated" (``SimulatedTrainer``, the benchmarks' stand-in: a
tiny state, no model).

What the trainer service relies on: a step moves the weights and reports the documented metrics;
weights saved and loaded back are bit for bit the same, and the tensors a push sends are the
saved ones; weights + full state + RNG from step s give a bit-identical step s + 1 in a fresh
backend (a restarted trainer goes on as if nothing happened); ``lr = 0`` moves nothing.

The tests share one backend per implementation where what they assert is relative to the state
they start from (Ray rank groups take seconds to build); the others make their own.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from msgspec.structs import replace

from miles import shards
from miles.config import GRPO, LoraConfig, SimulatedTrainerConfig, TrainerConfig
from miles.events import TrainSample
from miles.trainer import StepMetrics, TorchTrainer, TrainerBackend
from miles.trainer.simulated import SimulatedTrainer

SEED = 0
TRAINER = TrainerConfig(threads=1, micro_batch_size=2, lr=1e-2)
SMALL_SHARDS = 200_000
"""Bytes: the tiny Llama's weights (2.6 MB in fp32) in a dozen shards."""
GRPO = GRPO(
    kl_coef=0.1, old_logprobs="engine", aggregation="token_mean"
)  # a reference model and ratios != 1
BUILT_IN_METRICS = (
    "loss",
    "kl",
    "clip_frac",
    "ratio_mean",
    "engine_gap",
    "mismatch_kl",
    "mismatch_ratio_mean",
    "mismatch_ratio_max",
    "mismatch_masked",
    "optimizer_steps",
    "grad_norm",
    "tokens",
    "seconds_forward_backward",
    "seconds_optimizer",
)


def make_samples(seed: int, count: int = 6, vocab: int = 14) -> list[TrainSample]:
    """Prompts and responses of different lengths (the addition tokenizer's 14 ids), behaviour
    logprobs and mixed advantages."""
    rng = random.Random(seed)
    samples = []
    for index in range(count):
        prompt = [rng.randrange(2, vocab) for _ in range(rng.randrange(2, 6))]
        response = [rng.randrange(1, vocab) for _ in range(rng.randrange(1, 5))]
        samples.append(
            TrainSample(
                sample_id=f"s{seed}/{index}",
                prompt_ids=prompt,
                response_ids=response,
                response_logprobs=[rng.uniform(-3.0, -0.5) for _ in response],
                advantage=rng.uniform(-1.0, 1.0),
                reward=0.0,
                policy_version=0,
            )
        )
    return samples


@dataclass
class Backends:
    """Builds backends of one implementation on the tiny model, and shuts down what it built."""

    kind: str
    model: Path
    built: list[Any] = field(default_factory=list)

    def make(self, trainer: TrainerConfig = TRAINER) -> TrainerBackend:
        if self.kind == "torch":
            return TorchTrainer(str(self.model), trainer, GRPO, SEED)
        if self.kind == "torch-sharded":
            sharded = trainer.model_copy(update={"max_shard_bytes": SMALL_SHARDS})
            return TorchTrainer(str(self.model), sharded, GRPO, SEED)
        if self.kind == "simulated":  # no time to spend here
            instant = SimulatedTrainerConfig(seconds_per_step=0.0)
            return SimulatedTrainer(trainer.model_copy(update={"simulated": instant}), SEED)
        if self.kind == "torch-lora":
            with_lora = trainer.model_copy(update={"lora": LoraConfig(rank=4)})
            return TorchTrainer(str(self.model), with_lora, GRPO, SEED)
        if self.kind == "fsdp":
            from miles.trainer.fsdp.group import FsdpRayGroup

            fsdp = FsdpRayGroup(str(self.model), trainer, GRPO, SEED, world_size=2)
            self.built.append(fsdp)
            return fsdp
        from miles.trainer.megatron.model import MegatronLayout
        from miles.trainer.megatron.ray_group import MegatronRayGroup

        group = MegatronRayGroup(
            str(self.model), trainer, GRPO, SEED, MegatronLayout(tensor_parallel=2)
        )
        self.built.append(group)
        return group

    @contextlib.contextmanager
    def fresh(self, trainer: TrainerConfig = TRAINER) -> Iterator[TrainerBackend]:
        """A backend of its own for one test, shut down after it (Ray's CPUs are few)."""
        made = self.make(trainer)
        try:
            yield made
        finally:
            self.release(made)

    def release(self, backend: TrainerBackend) -> None:
        """Shut down a rank group this built (a torch backend is plain memory)."""
        for group in [built for built in self.built if built is backend]:
            self.built.remove(group)
            group.shutdown()

    def close(self) -> None:
        for group in list(self.built):
            self.release(group)


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("torch", id="torch"),
        pytest.param("torch-lora", id="torch-lora"),
        pytest.param("torch-sharded", id="torch-sharded"),
        pytest.param("simulated", id="simulated"),
        pytest.param("megatron", id="megatron", marks=pytest.mark.integration),
        pytest.param("fsdp", id="fsdp", marks=pytest.mark.integration),
    ],
)
def backends(request: pytest.FixtureRequest, tiny_model: Path) -> Iterator[Backends]:
    if request.param == "megatron":
        pytest.importorskip("megatron.core", reason="megatron-core is an optional dependency")
        request.getfixturevalue("ray_cluster")  # started only for the megatron params
    if request.param == "fsdp":
        request.getfixturevalue("ray_cluster")
    torch.set_num_threads(1)
    made = Backends(request.param, tiny_model)
    yield made
    made.close()


@pytest.fixture(scope="module")
def backend(backends: Backends) -> TrainerBackend:
    """The backend the relative tests share, at whatever step the tests before left it."""
    return backends.make()


def weights(backend: TrainerBackend, directory: Path) -> dict[str, torch.Tensor]:
    """What ``save_weights`` writes, checked against the digest it returns."""
    digest = backend.save_weights(str(directory))
    assert (directory / "config.json").is_file()
    assert shards.weights_digest(directory) == digest
    shards.verify_weights(directory, digest)  # every shard, when there are several
    return shards.read_weights(directory)


def same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> bool:
    assert left.keys() == right.keys()
    return all(torch.equal(left[name], right[name]) for name in left)


def test_a_step_moves_the_weights_and_reports_the_documented_metrics(
    backend: TrainerBackend, tmp_path: Path
) -> None:
    samples = make_samples(1)
    before = weights(backend, tmp_path / "before")

    metrics = backend.train_step(samples)

    assert isinstance(metrics, StepMetrics)
    reported = metrics.to_dict()
    assert set(reported) == set(BUILT_IN_METRICS)  # cpu_seconds is the actor's to add
    assert all(math.isfinite(value) for value in reported.values()), reported
    assert metrics.tokens == sum(len(s.response_ids) for s in samples)
    assert metrics.grad_norm is not None and metrics.grad_norm > 0
    assert metrics.kl is not None and metrics.kl >= 0
    assert metrics.clip_frac is not None and 0 <= metrics.clip_frac <= 1
    assert not same(weights(backend, tmp_path / "after"), before)


def test_weights_saved_and_loaded_back_are_bit_for_bit_the_same(
    backend: TrainerBackend, tmp_path: Path
) -> None:
    saved = weights(backend, tmp_path / "saved")
    digest = shards.weights_digest(tmp_path / "saved")
    backend.train_step(make_samples(2))
    assert not same(weights(backend, tmp_path / "moved"), saved)

    backend.load_weights(str(tmp_path / "saved"))

    assert backend.save_weights(str(tmp_path / "again")) == digest
    assert same(shards.read_weights(tmp_path / "again"), saved)
    # A push sends the saved tensors under their HF names (a tied one may appear twice).
    named = backend.named_tensors()
    assert saved.keys() <= named.keys()
    assert all(torch.equal(named[name].cpu(), saved[name]) for name in saved)


def test_weights_larger_than_max_shard_bytes_go_out_as_shards_and_an_index(
    backends: Backends, tmp_path: Path
) -> None:
    if backends.kind == "simulated":
        pytest.skip("the simulated backend's weights are one 16-float tensor: nothing to split")
    with backends.fresh() as whole:
        one = weights(whole, tmp_path / "one")
    small = TRAINER.model_copy(update={"max_shard_bytes": SMALL_SHARDS})
    with backends.fresh(small) as sharded:
        several = weights(sharded, tmp_path / "several")
        files = shards.weight_files(tmp_path / "several")
        assert len(files) > 1 and (tmp_path / "several" / shards.INDEX_FILE).is_file()
        assert not (tmp_path / "several" / shards.WEIGHTS_FILE).exists()
        # A shard passes the bound only by its header, or by one tensor larger than the bound.
        largest = max(t.numel() * t.element_size() for t in several.values())
        assert all(f.stat().st_size <= max(SMALL_SHARDS, largest) + 4096 for f in files)
        assert same(several, one)  # the same tensors, however they are split

        sharded.load_weights(str(tmp_path / "one"))  # a backend reads either layout
        sharded.load_weights(str(tmp_path / "several"))
        assert same(weights(sharded, tmp_path / "again"), one)


def test_weights_state_and_rng_give_a_bit_identical_next_step_in_a_fresh_backend(
    backends: Backends, backend: TrainerBackend, tmp_path: Path
) -> None:
    backend.train_step(make_samples(3))
    weights(backend, tmp_path / "weights")
    state_sha256 = backend.save_state(str(tmp_path / "state"))
    state_file = tmp_path / "state" / backend.state_file
    assert hashlib.sha256(state_file.read_bytes()).hexdigest() == state_sha256
    rng = backend.rng_state()
    expected = backend.train_step(make_samples(4))
    expected_weights = weights(backend, tmp_path / "expected")

    with backends.fresh() as restarted:  # as a restarted trainer resumes: the base model first
        restarted.load_weights(str(tmp_path / "weights"))
        restarted.load_state(str(tmp_path / "state"))
        restarted.set_rng_state(rng)
        assert restarted.rng_state() == rng
        resumed = restarted.train_step(make_samples(4))
        resumed_weights = weights(restarted, tmp_path / "resumed")

    assert same(resumed_weights, expected_weights)
    for key, value in expected.items():
        if not key.startswith("seconds"):
            assert resumed[key] == value, key


def test_zero_lr_leaves_the_weights_unchanged(backends: Backends, tmp_path: Path) -> None:
    frozen = TRAINER.model_copy(update={"lr": 0.0, "weight_decay": 0.1})
    with backends.fresh(frozen) as backend:
        before = weights(backend, tmp_path / "before")
        metrics = backend.train_step(make_samples(5))
        after = weights(backend, tmp_path / "after")
    assert metrics.grad_norm is not None and metrics.grad_norm > 0  # there was a gradient
    assert same(after, before)


def test_a_learning_rate_scaled_to_zero_and_back(backends: Backends, tmp_path: Path) -> None:
    """``scale_learning_rate(0)`` freezes the next step (weight decay included: AdamW scales it
    by the rate); back at 1 the step moves the weights again."""
    decaying = TRAINER.model_copy(update={"weight_decay": 0.1})
    with backends.fresh(decaying) as backend:
        backend.scale_learning_rate(0.0)
        before = weights(backend, tmp_path / "before")
        backend.train_step(make_samples(6))
        frozen = weights(backend, tmp_path / "frozen")
        backend.scale_learning_rate(1.0)
        backend.train_step(make_samples(7))
        moved = weights(backend, tmp_path / "moved")
    assert same(frozen, before)
    assert not same(moved, before)


def with_tool_turns(samples: list[TrainSample], seed: int, vocab: int = 14) -> list[TrainSample]:
    """Multi-turn samples: each response, a tool's output (masked), the model again, and a
    trailing tool output (masked); the tool's tokens carry logprob 0.0, as a trajectory's do."""
    rng = random.Random(seed)
    turned = []
    for sample in samples:
        tool, tail = [rng.randrange(1, vocab) for _ in range(3)], [rng.randrange(1, vocab)]
        second = [rng.randrange(1, vocab) for _ in range(2)]
        turned.append(
            replace(
                sample,
                response_ids=sample.response_ids + tool + second + tail,
                response_logprobs=sample.response_logprobs + [0.0] * 3 + [-1.0, -2.0] + [0.0],
                loss_mask=[1] * len(sample.response_ids) + [0, 0, 0, 1, 1, 0],
            )
        )
    return turned


def test_masked_tokens_change_neither_the_loss_nor_the_gradient(
    backend: TrainerBackend, tmp_path: Path
) -> None:
    """Tool tokens are inputs, never targets: a batch whose masked tokens report other
    logprobs, and whose trailing masked tokens are other tokens, gives the same loss and
    gradient norm from the same weights, and only trained tokens count."""
    weights(backend, tmp_path / "start")
    samples = with_tool_turns(make_samples(8), seed=8)
    other = [
        replace(
            sample,
            response_ids=[*sample.response_ids[:-1], (sample.response_ids[-1] + 5) % 14],
            response_logprobs=[
                logprob if trained else -9.0
                for logprob, trained in zip(sample.response_logprobs, sample.loss_mask, strict=True)
            ],
        )
        for sample in samples
    ]
    first = backend.train_step(samples)
    backend.load_weights(str(tmp_path / "start"))
    second = backend.train_step(other)

    assert first.tokens == sum(sum(sample.loss_mask) for sample in samples)
    for key in ("loss", "grad_norm", "kl", "clip_frac", "ratio_mean", "engine_gap", "tokens"):
        assert second[key] == first[key], key

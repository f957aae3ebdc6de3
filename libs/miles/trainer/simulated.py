"""A ``TrainerBackend`` that spends time without using the CPU: for measuring orchestration.

``trainer.backend = "simulated"`` (benchmarks and tests). A step sleeps
``seconds_per_step + seconds_per_sample * len(samples)`` (the actor is its own Ray worker, so a
sleep there blocks nothing else) and then updates a 16-float "policy" the way an optimizer
would, so everything around it is real: weights written as safetensors with their sha256,
optimizer moments and RNG in a full state, manifests, resume and the trainer-backend contract
(``tests/contract/test_trainer_backend.py``).

The update is a pure function of the weights and what a loss sees (advantages and the logprobs
of trained tokens; masked tool tokens are left out), so a resumed step is bit for bit the one it
replaces. Its "gradient" is invented: nothing here learns. A step draws nothing from the RNG;
the generator is carried through the full state and the manifest like a real backend's. The
weights it publishes are only loadable by simulated engines (the config refuses other engines).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from miles import shards
from miles.config import TrainerConfig
from miles.events import TrainSample
from miles.trainer.protocol import StepMetrics

STATE_FILE = "simulated_state.safetensors"
WEIGHT_NAME = "simulated.weight"
SIZE = 16
BETA = 0.9
"""Momentum of the simulated optimizer's one moment (Adam's beta1)."""


class SimulatedTrainer:
    state_file = STATE_FILE

    def __init__(
        self, trainer: TrainerConfig, seed: int, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.trainer = trainer
        self.simulated = trainer.simulated
        self.sleep = sleep
        self.lr = trainer.lr
        self.generator = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(SIZE, generator=torch.Generator().manual_seed(seed))
        self.moment = torch.zeros(SIZE)

    def train_step(self, samples: list[TrainSample]) -> StepMetrics:
        seconds = self.simulated.seconds_per_step + self.simulated.seconds_per_sample * len(samples)
        self.sleep(seconds)
        tokens, signal = 0, 0.0
        for sample in samples:
            mask = sample.loss_mask or [1] * len(sample.response_ids)
            trained = [lp for lp, keep in zip(sample.response_logprobs, mask, strict=True) if keep]
            tokens += len(trained)
            signal += sample.advantage * sum(trained)
        signal /= max(tokens, 1)
        loss = signal + 0.05 * float(self.weight.square().sum())  # before the update, as a loss
        gradient = signal + 0.1 * self.weight
        self.moment = BETA * self.moment + (1 - BETA) * gradient
        decay = self.trainer.weight_decay * self.weight
        self.weight = self.weight - self.lr * (self.moment + decay)
        return StepMetrics(
            loss=loss,
            kl=0.0,
            clip_frac=0.0,
            ratio_mean=1.0,
            engine_gap=0.0,
            mismatch_kl=0.0,
            mismatch_ratio_mean=1.0,
            mismatch_ratio_max=1.0,
            mismatch_masked=0.0,
            optimizer_steps=1.0,
            grad_norm=float(gradient.norm()),
            tokens=float(tokens),
            seconds_forward_backward=seconds,
            seconds_optimizer=0.0,
        )

    def scale_learning_rate(self, factor: float) -> None:
        self.lr = self.trainer.lr * factor

    def save_weights(self, directory: str) -> str:
        self.sleep(self.simulated.save_seconds)
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps({"model_type": "miles-simulated"}))
        weights = [(WEIGHT_NAME, self.weight.contiguous())]
        return shards.write_weights(weights, path, self.trainer.max_shard_bytes)

    def load_weights(self, directory: str) -> None:
        self.weight = shards.read_weights(directory)[WEIGHT_NAME]

    def named_tensors(self) -> dict[str, Tensor]:
        return {WEIGHT_NAME: self.weight}

    def save_state(self, directory: str) -> str:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        state = {"moment": self.moment, "rng": self.generator.get_state()}
        return _save(path / STATE_FILE, state)

    def load_state(self, directory: str) -> None:
        state = load_file(Path(directory) / STATE_FILE)
        self.moment = state["moment"]
        self.generator.set_state(state["rng"])

    def rng_state(self) -> str:
        return base64.b64encode(self.generator.get_state().numpy().tobytes()).decode()

    def set_rng_state(self, encoded: str) -> None:
        raw = bytearray(base64.b64decode(encoded))
        self.generator.set_state(torch.frombuffer(raw, dtype=torch.uint8).clone())


def _save(path: Path, tensors: dict[str, Tensor]) -> str:
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()

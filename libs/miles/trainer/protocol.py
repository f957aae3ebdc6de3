"""The trainer seam: everything the trainer service's actor asks of a training backend.

Two implementations: ``TorchTrainer`` (one process, the HF model) and ``MegatronRayGroup``
(Megatron-core ranks as Ray actors); ``tests/contract/test_trainer_backend.py`` holds both to
this contract. One ``train_step`` is one optimizer step on one batch; weights cross to the
engines as an HF directory (``config.json`` + safetensors with HF parameter names, one file or
shards and an index: ``miles.shards``), which the engine's ``update_weights_from_disk`` loads,
or as the same tensors pushed live.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

from miles.events import TrainSample


@dataclass(frozen=True, eq=False)
class StepMetrics(Mapping[str, float]):
    """What one optimizer step reports, readable by name (``metrics.loss``) or as the mapping
    the manifest stores (``metrics["loss"]``, ``dict(metrics)``).

    The built-in GRPO step reports every field (the actor adds ``cpu_seconds``). A recipe's
    ``@miles.update`` returns its own dict, of which only ``loss`` is required: a field it does
    not report is None and absent from the mapping, so the manifest keeps exactly what was
    measured. Keys beyond the named fields (a custom update's own statistics) are kept in
    ``extra``. A mapping rather than a plain struct because the manifest's ``metrics`` wire
    format is that mapping, and the built-in and custom steps report different key sets.
    """

    loss: float
    kl: float | None = None
    """The KL estimate to the reference policy (0 when ``algorithm.kl_coef`` is 0)."""
    entropy: float | None = None
    """The policy's entropy on the response (0 unless ``algorithm.entropy_coef`` > 0)."""
    clip_frac: float | None = None
    """Share of response tokens whose ratio was clipped."""
    ratio_mean: float | None = None
    engine_gap: float | None = None
    """Mean |trainer - engine| logprob per token: the train/inference mismatch."""
    mismatch_kl: float | None = None
    """k3 estimate of KL between the trainer's pre-update and the engine's logprobs."""
    mismatch_ratio_mean: float | None = None
    mismatch_ratio_max: float | None = None
    """Mean and largest pi_trainer / pi_engine (per token, or per sequence at that level)."""
    mismatch_masked: float | None = None
    """Share of response tokens masked importance sampling dropped."""
    optimizer_steps: float | None = None
    """Optimizer steps the batch took: ppo_epochs * mini_batches."""
    grad_norm: float | None = None
    """The global gradient norm before clipping."""
    tokens: float | None = None
    """Response tokens in the batch: the ones the loss sees."""
    seconds_forward_backward: float | None = None
    seconds_optimizer: float | None = None
    cpu_seconds: float | None = None
    """The trainer actor's CPU time for the whole call (set by the actor, not the backend)."""
    lr: float | None = None
    """The policy's learning rate for the step (set by the actor, from the schedule)."""
    extra: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, values: Mapping[str, float]) -> StepMetrics:
        """From a dict such as ``@miles.update`` returns; values become floats (a 0-d tensor
        included), and a missing ``loss`` is an error naming the culprit."""
        if "loss" not in values:
            raise ValueError(
                f"a training step must report its 'loss'; it reported {sorted(values)}"
            )
        named = {key: float(value) for key, value in values.items() if key in _NAMED}
        extra = {key: float(value) for key, value in values.items() if key not in _NAMED}
        return cls(**named, extra=extra)

    def with_cpu_seconds(self, seconds: float) -> StepMetrics:
        return dataclasses.replace(self, cpu_seconds=seconds)

    def with_lr(self, lr: float) -> StepMetrics:
        return dataclasses.replace(self, lr=lr)

    def to_dict(self) -> dict[str, float]:
        """The manifest's ``metrics`` (and the telemetry's input): the reported keys only."""
        return dict(self)

    def __getitem__(self, key: str) -> float:
        return self._reported()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._reported())

    def __len__(self) -> int:
        return len(self._reported())

    def _reported(self) -> dict[str, float]:
        named = {
            "loss": self.loss,
            "kl": self.kl,
            "clip_frac": self.clip_frac,
            "ratio_mean": self.ratio_mean,
            "engine_gap": self.engine_gap,
            "entropy": self.entropy,
            "mismatch_kl": self.mismatch_kl,
            "mismatch_ratio_mean": self.mismatch_ratio_mean,
            "mismatch_ratio_max": self.mismatch_ratio_max,
            "mismatch_masked": self.mismatch_masked,
            "optimizer_steps": self.optimizer_steps,
            "grad_norm": self.grad_norm,
            "tokens": self.tokens,
            "seconds_forward_backward": self.seconds_forward_backward,
            "seconds_optimizer": self.seconds_optimizer,
            "cpu_seconds": self.cpu_seconds,
            "lr": self.lr,
        }
        return {key: value for key, value in named.items() if value is not None} | dict(self.extra)


_NAMED = frozenset(f.name for f in dataclasses.fields(StepMetrics)) - {"extra"}


class TrainerBackend(Protocol):
    """A policy being trained. Calls are synchronous and come from one caller, in order."""

    @property
    def state_file(self) -> str:
        """The file of a ``save_state`` directory whose sha256 ``save_state`` returns: the blob
        store checks that one file on the way back (``BlobStore.get_dir(..., checked=...)``)."""
        ...

    def train_step(self, samples: list[TrainSample]) -> StepMetrics:
        """One batch: ``algorithm.ppo_epochs * mini_batches`` optimizer steps on ``samples``.
        The built-in step reports every named field of ``StepMetrics`` except ``cpu_seconds``
        (and ``optimizer_steps`` and ``entropy`` where a backend takes one step per batch)."""
        ...

    def scale_learning_rate(self, factor: float) -> None:
        """Set every optimizer's rate to its configured base times ``factor`` (the schedule's,
        ``miles.trainer.schedule``) for the steps that follow."""
        ...

    def save_weights(self, directory: str) -> str:
        """Write ``config.json`` and the weights (``miles.shards.write_weights``, shards of at
        most ``trainer.max_shard_bytes``) into ``directory``; return their
        ``miles.shards.weights_digest``."""
        ...

    def load_weights(self, directory: str) -> None:
        """Replace the policy weights with those ``save_weights`` wrote to ``directory``; the
        optimizer moments and the reference policy are kept."""
        ...

    def named_tensors(self) -> dict[str, Tensor]:
        """The policy's tensors under their HF names, for a push into live engines: every
        tensor ``save_weights`` writes, equal to it; a tied tensor may appear under each of its
        names (the push sends one storage once)."""
        ...

    def save_state(self, directory: str) -> str:
        """Write the optimizer moments and the RNG into ``directory``, for a resume that goes
        on bit for bit; return the sha256 of its ``state_file``."""
        ...

    def load_state(self, directory: str) -> None:
        """The optimizer moments and RNG ``save_state`` wrote (after ``load_weights``)."""
        ...

    def rng_state(self) -> str:
        """The torch CPU generator state, base64: the manifest's ``rng_state``."""
        ...

    def set_rng_state(self, encoded: str) -> None: ...

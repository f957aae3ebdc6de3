"""The trainer seam: what the trainer service needs from a training backend.

One call is one optimizer step on one batch; weights cross to the engines as an HF directory
(``config.json`` + ``model.safetensors`` with HF parameter names), which the engine's
``update_weights_from_disk`` loads.
"""

from __future__ import annotations

from typing import Protocol

from miles.events import TrainSample


class TrainerBackend(Protocol):
    def train_step(self, samples: list[TrainSample]) -> dict[str, float]:
        """One optimizer step on ``samples``; returns at least ``loss``, ``grad_norm``, ``kl``,
        ``clip_frac``, ``tokens``, ``seconds_forward_backward`` and ``seconds_optimizer``."""
        ...

    def save_weights(self, directory: str) -> str:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``; return the sha256
        hex digest of ``model.safetensors``."""
        ...

    def load_weights(self, directory: str) -> None:
        """Replace the policy weights with those ``save_weights`` wrote to ``directory``."""
        ...

"""Training backends behind one seam: a step on ``TrainSample``s in, HF safetensors out."""

from miles.trainer.batch import TensorBatch, collate, split, token_logprobs
from miles.trainer.protocol import StepMetrics, TrainerBackend
from miles.trainer.torch_backend import TorchTrainer, UpdateFn

__all__ = [
    "StepMetrics",
    "TensorBatch",
    "TorchTrainer",
    "TrainerBackend",
    "UpdateFn",
    "collate",
    "split",
    "token_logprobs",
]

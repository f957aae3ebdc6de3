"""The Megatron-core trainer backend (tensor, pipeline and data parallel); see README.md."""

from miles.trainer.megatron.backend import MegatronTrainer
from miles.trainer.megatron.model import MegatronLayout

__all__ = ["MegatronLayout", "MegatronTrainer"]

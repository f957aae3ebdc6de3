"""miles: reinforcement-learning post-training of LLMs as five services on NATS JetStream.

The public API is what a recipe needs; everything else is internal.
"""

from miles.config import MilesConfig
from miles.engine.generation import EngineHandle, default_rollout, to_sample
from miles.engine.protocol import GenerateOutput, GenerateRequest, SamplingParams
from miles.engine.trajectory import Trajectory
from miles.events import Sample, Task, TrainSample, Turn
from miles.recipe import dataset, reward, rollout, setup, update
from miles.scoring import builtin as rewards

__all__ = [
    "EngineHandle",
    "GenerateOutput",
    "GenerateRequest",
    "MilesConfig",
    "Sample",
    "SamplingParams",
    "Task",
    "TrainSample",
    "Trajectory",
    "Turn",
    "dataset",
    "default_rollout",
    "reward",
    "rewards",
    "rollout",
    "setup",
    "to_sample",
    "update",
]

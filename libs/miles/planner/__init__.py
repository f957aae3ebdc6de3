"""The parallelism planner behind `miles plan`: training TP/PP/CP/DP/EP and rollout engines.

Pure arithmetic (no torch): a memory model and a cost model evaluate every valid layout; the
fastest one that fits is chosen and explained.
"""

from miles.planner.memory import MemoryBreakdown, RolloutMemory, layer_activation_bytes
from miles.planner.plan import Plan, build_plan
from miles.planner.presets import GPU_PRESETS, MODEL_PRESETS
from miles.planner.rollout import RolloutPlan
from miles.planner.search import Candidate, PlanError
from miles.planner.specs import Cluster, Layout, ModelSpec, PlanOptions

__all__ = [
    "GPU_PRESETS",
    "MODEL_PRESETS",
    "Candidate",
    "Cluster",
    "Layout",
    "MemoryBreakdown",
    "ModelSpec",
    "Plan",
    "PlanError",
    "PlanOptions",
    "RolloutMemory",
    "RolloutPlan",
    "build_plan",
    "layer_activation_bytes",
]

"""`build_plan`: the training layout, the rollout engines and the reasons, in one result."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from miles.planner.explain import explain
from miles.planner.rollout import RolloutPlan, plan_rollout, split_gpus
from miles.planner.search import Candidate, rank, usable_gib
from miles.planner.specs import Cluster, ModelSpec, PlanOptions


class Plan(BaseModel):
    model_config = ConfigDict(frozen=True)

    model: ModelSpec
    cluster: Cluster
    options: PlanOptions
    train_gpus: int
    usable_gib: float
    choice: Candidate
    candidates: list[Candidate]
    """Fitting layouts fastest first, then the others by memory."""
    rollout: RolloutPlan
    explanation: list[str]


def build_plan(model: ModelSpec, cluster: Cluster, options: PlanOptions) -> Plan:
    """Raises PlanError when nothing fits, naming the constraint or memory component."""
    train_cluster, rollout_gpus = split_gpus(cluster, options)
    fitting, others = rank(model, train_cluster, options)
    rollout = plan_rollout(model, cluster, options, rollout_gpus)
    return Plan(
        model=model,
        cluster=cluster,
        options=options,
        train_gpus=train_cluster.gpus,
        usable_gib=usable_gib(cluster, options),
        choice=fitting[0],
        candidates=fitting + others,
        rollout=rollout,
        explanation=explain(model, train_cluster, options, fitting, others, rollout),
    )

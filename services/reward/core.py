"""The reward service's decisions, without the bus: the scored group a generated group becomes,
where it goes, and what is left to do when it is too large to publish."""

from __future__ import annotations

from dataclasses import dataclass

from miles.events import GeneratedGroup, ScoredGroup
from miles.runtime.subjects import Subjects


@dataclass(frozen=True)
class Delivery:
    """A scored group, the subject it goes to and its ``Nats-Msg-Id`` (a repeated publish after
    a crash is dropped by it)."""

    scored: ScoredGroup
    subject: str
    msg_id: str
    replace_if_oversized: bool
    """When the group is too large to publish (the bus dead-letters it), record it as filtered
    ("oversized") so the coordinator's pacing dispatches a replacement. Training groups only:
    an evaluation round missing a group is recorded partial at its deadline instead."""


def scored_group(run_id: str, group: GeneratedGroup, score_seconds: float) -> ScoredGroup:
    """The group after scoring: its samples carry their rewards (or ``failed``) already."""
    return ScoredGroup(
        run_id=run_id,
        policy_version=group.policy_version,
        task_id=group.task_id,
        split=group.split,
        eval_round=group.eval_round,
        samples=group.samples,
        score_seconds=score_seconds,
    )


def delivery(subjects: Subjects, scored: ScoredGroup) -> Delivery:
    """Training groups go to the buffer, evaluation groups to the coordinator."""
    train = scored.split == "train"
    return Delivery(
        scored=scored,
        subject=subjects.scored if train else subjects.eval_scored,
        msg_id=f"scored/{scored.task_id}",
        replace_if_oversized=train,
    )

"""The buffer's decisions, as a state machine with no bus, no Redis and no awaits.

``BufferCore.step`` takes what one fetch brought (each group with the handle of its message),
the batch plans Redis holds for those groups and the trainer's policy version, and returns the
actions for the shell (``main.py``) to carry out, in order:

1. one action per arrived group, in arrival order: ``Ack`` (its batch was published before a
   restart), ``Hold`` (kept for a new batch, or for the planned batch it is in), or ``Drop``;
2. a ``Publish`` of every planned batch whose groups are all back again, unchanged;
3. when the policy version moved, ``Hold`` or ``Drop`` for every group held since (a new policy
   may have made it stale); groups waiting for a planned batch are never re-checked, since a
   planned batch is published as planned;
4. a ``Publish`` of every full batch of the other held groups, oldest dispatched first.

A message handle ``H`` is opaque here: it travels with its group so the shell can ack it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeAlias, TypeVar

from miles.algo.batching import BAD_INPUT, dispatch_order, filter_reason
from miles.config import BufferConfig
from miles.events import ScoredGroup
from miles.runtime.store import BatchPlan

H = TypeVar("H")


@dataclass(frozen=True)
class Held(Generic[H]):
    """A scored group and the handle of the message that brought it."""

    group: ScoredGroup
    handle: H

    @property
    def task_id(self) -> str:
        return self.group.task_id


@dataclass(frozen=True)
class Hold(Generic[H]):
    """Keep the group unacked until a batch takes it; ``replay`` names the batch planned
    before a restart that it waits for, if any."""

    held: Held[H]
    replay: str | None = None


@dataclass(frozen=True)
class Ack(Generic[H]):
    """The group's batch reached the stream before a restart: only its ack is missing."""

    held: Held[H]


@dataclass(frozen=True)
class Drop(Generic[H]):
    """The group cannot be trained on: record why, tell the coordinator (which dispatches a
    replacement), ack. ``dead_letter``: a broken producer made it, so an operator hears too."""

    held: Held[H]
    reason: str
    dead_letter: bool


@dataclass(frozen=True)
class Publish(Generic[H]):
    """Plan, publish, mark published, then ack these groups. ``replay`` names the batch planned
    before a restart that this publishes again, unchanged (the stream drops the duplicate)."""

    groups: list[Held[H]]
    replay: str | None = None

    def oversized(self) -> list[Drop[H]]:
        """What becomes of the groups when the batch is too large to publish: the bus has
        dead-lettered the batch already, so each group is only dropped."""
        return [Drop(held, "oversized", dead_letter=False) for held in self.groups]


Action: TypeAlias = Hold[H] | Ack[H] | Drop[H] | Publish[H]


@dataclass(frozen=True)
class Round(Generic[H]):
    """What one fetch leads to. ``holding``: groups are held short of a full batch (where the
    ``buffer.holding`` crash point fires, after the actions)."""

    actions: list[Action[H]]
    holding: bool


class BufferCore(Generic[H]):
    """The groups the buffer holds (unacked) and the planned batches it waits to replay."""

    def __init__(self, config: BufferConfig, renew_every: float, now: float) -> None:
        self.config = config
        self.renew_every = renew_every  # seconds between in-progress signals for held groups
        self.renewed_at = now
        self.pending: dict[str, Held[H]] = {}  # task id -> its group, newest handle
        self.replays: dict[str, list[str]] = {}  # batch id -> task ids: planned, not published
        self.version = -1  # the policy version the held groups were last checked against
        self.zero_variance_dropped = 0  # since the last new batch: DAPO's generation rounds

    @property
    def depth(self) -> int:
        return len(self.pending)

    def step(
        self, arrived: Sequence[Held[H]], plans: Mapping[str, BatchPlan], version: int
    ) -> Round[H]:
        actions: list[Action[H]] = [
            self._arrive(held, plans.get(held.task_id), version) for held in arrived
        ]
        actions += self._replay()
        if version != self.version:  # a new policy: groups held since may have gone stale
            fresh = {held.task_id for held in arrived}  # just checked against this version
            actions += self._recheck(version, fresh)
            self.version = version
        replaying = self._replaying()
        ready = sorted((t for t in self.pending if t not in replaying), key=dispatch_order)
        holding = 0 < len(ready) < self.config.groups_per_batch
        actions += self._batches(ready)
        return Round(actions, holding)

    def renewals(self, now: float) -> list[H]:
        """Handles to signal in-progress now, so the groups held stay ours (every
        ``renew_every`` seconds, a third of AckWait)."""
        if now - self.renewed_at <= self.renew_every:
            return []
        self.renewed_at = now
        return [held.handle for held in self.pending.values()]

    def _arrive(self, held: Held[H], plan: BatchPlan | None, version: int) -> Action[H]:
        if plan is not None and plan.published:  # its batch is in the stream
            self.pending.pop(held.task_id, None)
            return Ack(held)
        self.pending[held.task_id] = held  # a redelivered group replaces its stale handle
        if plan is not None:  # planned before a crash: wait for its whole batch
            self.replays[plan.batch_id] = plan.task_ids
            return Hold(held, replay=plan.batch_id)
        return self._admit(held, version)

    def _admit(self, held: Held[H], version: int) -> Hold[H] | Drop[H]:
        reason = filter_reason(held.group, version, self.config)
        if reason == "zero_variance" and self._over_sampled():
            reason = None  # trains nothing, but the step goes on (max_filter_rounds)
        if reason is None:
            return Hold(held)
        if reason == "zero_variance":
            self.zero_variance_dropped += 1
        del self.pending[held.task_id]
        return Drop(held, reason, dead_letter=reason in BAD_INPUT)

    def _over_sampled(self) -> bool:
        rounds = self.config.max_filter_rounds
        limit = None if rounds is None else rounds * self.config.groups_per_batch
        return limit is not None and self.zero_variance_dropped >= limit

    def _replay(self) -> list[Action[H]]:
        complete: list[Action[H]] = []
        for batch_id, task_ids in list(self.replays.items()):
            if all(task_id in self.pending for task_id in task_ids):
                complete.append(Publish([self.pending.pop(t) for t in task_ids], batch_id))
                del self.replays[batch_id]
        return complete

    def _recheck(self, version: int, fresh: set[str]) -> list[Action[H]]:
        replaying = self._replaying()
        return [
            self._admit(held, version)
            for task_id, held in list(self.pending.items())
            if task_id not in replaying and task_id not in fresh
        ]

    def _replaying(self) -> set[str]:
        return {task_id for task_ids in self.replays.values() for task_id in task_ids}

    def _batches(self, ready: list[str]) -> list[Action[H]]:
        size = self.config.groups_per_batch
        full = len(ready) - len(ready) % size
        if full:
            self.zero_variance_dropped = 0
        return [
            Publish([self.pending.pop(t) for t in ready[start : start + size]])
            for start in range(0, full, size)
        ]

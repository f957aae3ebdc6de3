"""The run record as a port: what a service may ask of it, and the typed carriers it answers with.

Two implementations hold it to the same behaviour (tests/contract/test_run_record.py): Redis
(``store.RunStore`` and ``checkpoint.Manifests``: production, integration and chaos tests) and
the in-memory twins of ``memory_store``, which unit tests of the services' decisions drive in
milliseconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

import msgspec

from miles.events import Heartbeat

if TYPE_CHECKING:
    from miles.runtime.checkpoint import Manifest

Scalar = str | int | float
"""What one field of the run record hash holds."""


class RunRecord(msgspec.Struct, kw_only=True, frozen=True):
    """The run record hash, read back typed. Every field has its value for a run not created
    yet (or created by an older version), so reading one never fails on a missing field."""

    run_id: str = ""
    config_hash: str = ""
    status: str = ""
    """``running`` from `create_run`, ``finished`` once the coordinator saw the last step,
    ``drained`` once it stopped the run at ``drain_step`` (`miles drain`), ``stopped`` when a
    stop control event ended it before (a resume sets either running again)."""
    stop_reason: str = ""
    """The stop control event's reason, for a ``stopped`` run."""
    started: float | None = None
    finished: float | None = None
    step: int = 0
    """The last committed step (the commit moves it, with ``policy_version``)."""
    policy_version: int = 0
    trained_groups: int = 0
    trained_samples: int = 0
    cursor: int = 0
    """Training prompts the coordinator has dispatched: where a restarted one resumes."""
    reward_mean: float | None = None
    """Of the last committed step's trained samples."""
    loss: float | None = None
    accuracy: float | None = None
    """Of the last recorded evaluation, after step ``eval_step``."""
    eval_step: int | None = None
    paused: int = 0
    """1 while an operator paused dispatching (`miles pause`; `miles resume` clears it)."""
    drain_step: int = 0
    """The step a drain (`miles drain`) ends the run at, once committed; 0: no drain."""

    @classmethod
    def decode(cls, fields: Mapping[str, Scalar]) -> RunRecord:
        """From the hash as stored: Redis keeps strings, which lax conversion parses."""
        return msgspec.convert(fields, cls, strict=False)

    @classmethod
    def check(cls, fields: Mapping[str, Scalar]) -> None:
        """Refuse an update that a later read would drop (an unknown name) or fail on."""
        unknown = sorted(set(fields) - set(cls.__struct_fields__))
        if unknown:
            raise ValueError(f"not fields of the run record: {', '.join(unknown)}")
        cls.decode(fields)


class EvalExample(msgspec.Struct, kw_only=True, frozen=True):
    """One held-out prompt and the policy's greedy completion, for the trackers' tables."""

    prompt: str
    completion: str
    label: str
    reward: float


class EvalResult(msgspec.Struct, kw_only=True, frozen=True):
    """One held-out evaluation round, as the coordinator records it (one JSON row each)."""

    round: int
    after_step: int
    policy_versions: list[int]
    """The versions that generated its samples (one, unless weights moved mid-round)."""
    accuracy: float
    reward_mean: float
    n: int
    """Results that arrived: fewer than ``expected`` when the round timed out."""
    expected: int
    time: float
    examples: list[EvalExample] = []
    """The round's first held-out prompts (in dataset order) with their completions."""


class BatchPlan(msgspec.Struct, frozen=True):
    """A batch the buffer planned: its groups in order, and whether it reached the stream."""

    batch_id: str
    task_ids: list[str]
    published: bool


class RunStorePort(Protocol):
    """One run's record: its hash, evaluations, heartbeats, counters and batch plans."""

    async def create_run(self, config_hash: str, config_json: str) -> bool:
        """Record a new run; False when it exists (a restarted coordinator); ValueError when
        it exists with another config."""
        ...

    async def record(self) -> RunRecord: ...

    async def update(self, **fields: Scalar) -> None: ...

    async def status(self) -> str | None: ...

    async def policy_version(self) -> int: ...

    async def add_eval(self, result: EvalResult) -> None: ...

    async def evals(self) -> list[EvalResult]: ...

    async def heartbeat(self, beat: Heartbeat) -> None:
        """Keep an instance's last heartbeat (a later one replaces it)."""
        ...

    async def services(self) -> dict[str, Heartbeat]:
        """``service/instance`` -> its last heartbeat."""
        ...

    async def count_dead_letter(self, reason: str) -> None: ...

    async def dead_letters(self) -> dict[str, int]: ...

    async def restarts(self) -> dict[str, int]:
        """Service -> how often `miles run` restarted it."""
        ...

    async def register_engines(self, urls: dict[str, str]) -> None: ...

    async def forget_engines(self, names: list[str]) -> None: ...

    async def engine_urls(self) -> list[str]: ...

    async def count_straggler(self, engine: str) -> None: ...

    async def stragglers(self) -> dict[str, int]: ...

    async def record_filtered(self, task_id: str, reason: str) -> bool:
        """Why a group was dropped, counted once per task: True the first time only."""
        ...

    async def filtered(self) -> dict[str, int]: ...

    async def filtered_groups(self) -> int: ...

    async def plan_batch(self, batch_id: str, task_ids: list[str]) -> None:
        """Record a batch's groups before it is published (a plan already made stays)."""
        ...

    async def mark_published(self, batch_id: str, task_ids: list[str]) -> None: ...

    async def batch_plans(self, task_ids: list[str]) -> dict[str, BatchPlan]:
        """Task id -> the plan of the batch it is in, for the tasks already batched."""
        ...


class ManifestsPort(Protocol):
    """One run's committed steps. ``commit`` writes a manifest once and moves ``latest`` to it
    atomically, or raises ``CommitRefused``: ``trained`` (one of its batches is in the ledger),
    ``not_next`` (its step is not latest + 1), ``exists`` (a manifest of that step is there)."""

    async def commit(self, manifest: Manifest) -> None: ...

    async def latest_step(self) -> int: ...

    async def latest(self) -> Manifest | None: ...

    async def get(self, step: int) -> Manifest | None: ...

    async def all(self) -> list[Manifest]:
        """Every committed manifest, step 1 to latest."""
        ...

    async def trained(self, batch_id: str) -> bool: ...

    async def step_of(self, batch_id: str) -> Manifest | None:
        """The committed step that consumed ``batch_id``."""
        ...

    async def lease(self, step: int, holder: str, seconds: float) -> bool:
        """Keep step ``step``'s weights from collection for ``seconds`` (an export reading
        them); False when they were collected already. Leasing again extends the lease."""
        ...

    async def release(self, step: int, holder: str) -> None: ...

    async def leased(self) -> set[int]:
        """The steps an unexpired lease holds."""
        ...

    async def condemn(self, steps: list[int]) -> list[int]:
        """Mark those of ``steps`` no lease holds as collected, atomically with ``lease``, and
        return them (the trainer then deletes their weights). Marking again is harmless."""
        ...

    async def collected(self, step: int) -> bool: ...

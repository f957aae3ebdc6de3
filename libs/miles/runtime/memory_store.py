"""The run record in memory: twins of the Redis ``RunStore`` and ``Manifests`` for unit tests.

A ``MemoryRun`` holds what Redis holds under ``miles:run:<run_id>``; a ``MemoryRunStore`` and a
``MemoryManifests`` built on the same one see each other's writes, as several processes sharing
one Redis do. Structs are kept encoded, as Redis keeps them, so a reader gets its own copy and
what would not survive the trip through Redis does not survive here either. Nothing here awaits
between a read and its write, so on one event loop every call is as atomic as the Lua scripts it
stands in for. tests/contract/test_run_record.py holds both implementations to one behaviour.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import msgspec

from miles.events import Heartbeat
from miles.runtime.checkpoint import CommitRefused, Manifest
from miles.runtime.run_record import (
    BatchPlan,
    EvalResult,
    ManifestsPort,
    RunRecord,
    RunStorePort,
    Scalar,
)


@dataclass
class MemoryRun:
    """One run's record, shared by the twins built on it."""

    run_id: str
    fields: dict[str, Scalar] = field(default_factory=dict)
    config: str | None = None
    manifests: dict[int, bytes] = field(default_factory=dict)
    latest: int = 0
    trained: set[str] = field(default_factory=set)
    batched: dict[str, str] = field(default_factory=dict)
    batches: dict[str, bytes] = field(default_factory=dict)
    evals: list[bytes] = field(default_factory=list)
    services: dict[str, bytes] = field(default_factory=dict)
    dead: Counter[str] = field(default_factory=Counter)
    filtered: Counter[str] = field(default_factory=Counter)
    filtered_tasks: dict[str, str] = field(default_factory=dict)
    restarts: Counter[str] = field(default_factory=Counter)
    stragglers: Counter[str] = field(default_factory=Counter)
    engines: dict[str, str] = field(default_factory=dict)
    leases: dict[tuple[int, str], float] = field(default_factory=dict)
    """(step, holder) -> when the lease expires (``time.monotonic``)."""
    collected: set[int] = field(default_factory=set)


class MemoryRunStore(RunStorePort):
    """``run_record.RunStorePort`` in memory."""

    def __init__(self, state: MemoryRun) -> None:
        self.state = state
        self.run_id = state.run_id

    async def create_run(self, config_hash: str, config_json: str) -> bool:
        existing = self.state.fields.get("config_hash")
        if existing is None:
            self.state.fields |= {
                "config_hash": config_hash,
                "run_id": self.run_id,
                "status": "running",
                "started": time.time(),
                "step": 0,
                "policy_version": 0,
            }
            self.state.config = config_json
            return True
        if existing != config_hash:
            raise ValueError(f"run {self.run_id} exists with config {existing}, not {config_hash}")
        return False

    async def record(self) -> RunRecord:
        return RunRecord.decode(self.state.fields)

    async def update(self, **fields: Scalar) -> None:
        RunRecord.check(fields)
        self.state.fields |= fields

    async def status(self) -> str | None:
        status = self.state.fields.get("status")
        return None if status is None else str(status)

    async def policy_version(self) -> int:
        return int(self.state.fields.get("policy_version", 0))

    async def add_eval(self, result: EvalResult) -> None:
        self.state.evals.append(msgspec.json.encode(result))

    async def evals(self) -> list[EvalResult]:
        return [msgspec.json.decode(row, type=EvalResult) for row in self.state.evals]

    async def heartbeat(self, beat: Heartbeat) -> None:
        self.state.services[f"{beat.service}/{beat.instance}"] = msgspec.json.encode(beat)

    async def services(self) -> dict[str, Heartbeat]:
        return {
            key: msgspec.json.decode(row, type=Heartbeat)
            for key, row in self.state.services.items()
        }

    async def count_dead_letter(self, reason: str) -> None:
        self.state.dead[reason] += 1

    async def dead_letters(self) -> dict[str, int]:
        return dict(self.state.dead)

    async def restarts(self) -> dict[str, int]:
        return dict(self.state.restarts)

    async def register_engines(self, urls: dict[str, str]) -> None:
        self.state.engines |= urls

    async def forget_engines(self, names: list[str]) -> None:
        for name in names:
            self.state.engines.pop(name, None)

    async def engine_urls(self) -> list[str]:
        return sorted(set(self.state.engines.values()))

    async def count_straggler(self, engine: str) -> None:
        self.state.stragglers[engine] += 1

    async def stragglers(self) -> dict[str, int]:
        return dict(self.state.stragglers)

    async def record_filtered(self, task_id: str, reason: str) -> bool:
        if task_id in self.state.filtered_tasks:
            return False
        self.state.filtered_tasks[task_id] = reason
        self.state.filtered[reason] += 1
        return True

    async def filtered(self) -> dict[str, int]:
        return dict(self.state.filtered)

    async def filtered_groups(self) -> int:
        return len(self.state.filtered_tasks)

    async def plan_batch(self, batch_id: str, task_ids: list[str]) -> None:
        plan = BatchPlan(batch_id, task_ids, published=False)
        self.state.batches.setdefault(batch_id, msgspec.json.encode(plan))
        self.state.batched |= dict.fromkeys(task_ids, batch_id)

    async def mark_published(self, batch_id: str, task_ids: list[str]) -> None:
        plan = BatchPlan(batch_id, task_ids, published=True)
        self.state.batches[batch_id] = msgspec.json.encode(plan)

    async def batch_plans(self, task_ids: list[str]) -> dict[str, BatchPlan]:
        owners = {t: self.state.batched[t] for t in task_ids if t in self.state.batched}
        plans = {
            batch_id: msgspec.json.decode(self.state.batches[batch_id], type=BatchPlan)
            for batch_id in set(owners.values())
            if batch_id in self.state.batches
        }
        return {task_id: plans[b] for task_id, b in owners.items() if b in plans}


class MemoryManifests(ManifestsPort):
    """``run_record.ManifestsPort`` in memory, with the refusals of the commit script."""

    def __init__(self, state: MemoryRun) -> None:
        self.state = state

    async def commit(self, manifest: Manifest) -> None:
        state = self.state
        if any(batch_id in state.trained for batch_id in manifest.batch_ids):
            raise CommitRefused("trained", state.latest)
        if manifest.step != state.latest + 1:
            raise CommitRefused("not_next", state.latest)
        if manifest.step in state.manifests:
            raise CommitRefused("exists", state.latest)
        state.manifests[manifest.step] = msgspec.json.encode(manifest)
        state.latest = manifest.step
        state.trained |= set(manifest.batch_ids)
        fields = state.fields
        fields |= {"step": manifest.step, "policy_version": manifest.step}
        fields["trained_groups"] = int(fields.get("trained_groups", 0)) + len(manifest.task_ids)
        fields["trained_samples"] = int(fields.get("trained_samples", 0)) + len(manifest.sample_ids)

    async def latest_step(self) -> int:
        return self.state.latest

    async def latest(self) -> Manifest | None:
        step = await self.latest_step()
        return await self.get(step) if step else None

    async def get(self, step: int) -> Manifest | None:
        raw = self.state.manifests.get(step)
        return None if raw is None else msgspec.json.decode(raw, type=Manifest)

    async def all(self) -> list[Manifest]:
        found = [self.state.manifests.get(step) for step in range(1, self.state.latest + 1)]
        return [msgspec.json.decode(raw, type=Manifest) for raw in found if raw is not None]

    async def trained(self, batch_id: str) -> bool:
        return batch_id in self.state.trained

    async def step_of(self, batch_id: str) -> Manifest | None:
        for manifest in reversed(await self.all()):
            if batch_id in manifest.batch_ids:
                return manifest
        return None

    async def lease(self, step: int, holder: str, seconds: float) -> bool:
        if step in self.state.collected:
            return False
        self.state.leases[step, holder] = time.monotonic() + seconds
        return True

    async def release(self, step: int, holder: str) -> None:
        self.state.leases.pop((step, holder), None)

    async def leased(self) -> set[int]:
        now = time.monotonic()
        live = {key: until for key, until in self.state.leases.items() if until > now}
        self.state.leases = live
        return {step for step, _ in live}

    async def condemn(self, steps: list[int]) -> list[int]:
        held = await self.leased()
        marked = sorted(step for step in steps if step not in held)
        self.state.collected |= set(marked)
        return marked

    async def collected(self, step: int) -> bool:
        return step in self.state.collected

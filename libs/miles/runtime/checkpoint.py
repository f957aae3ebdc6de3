"""Checkpoint manifests: what one committed step is, written once, and the pointer to the latest.

A step commits when its manifest lands in Redis. The commit is one Lua script, so Redis runs it
atomically (a script is never interleaved with another client's commands):

    refuse if any of the step's batches is in the ledger of trained batches   -> "trained"
    refuse unless step == latest + 1 (compare-and-set: never backwards, never twice)
    SET manifest:<step> NX                                                  -> else "exists"
    move latest to step, add the batches to the ledger, move the run record's counters

The files a manifest names (weights, optimizer state) are written under temporary names and
renamed by the blob store before the commit, and their names are unique per attempt, so a reader
that follows ``latest`` never sees a torn or half-overwritten checkpoint. A trainer that dies
between its optimizer step and the commit leaves only unreferenced files behind.

Old steps' files are collected (``trainer.keep_checkpoints``). A reader that must not lose a
step's weights while it reads them (an export) leases the step; the trainer marks the steps it
is about to delete as collected. Both are Lua scripts over the same keys, so a step is either
leased or collected, never both: a lease on a collected step is refused, and a leased step is
not collected until its lease is released or expires.

``Manifests`` implements ``run_record.ManifestsPort``; ``memory_store.MemoryManifests`` is its
in-memory twin, held to the same refusals by tests/contract/test_run_record.py.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import redis.asyncio as aioredis

from miles.runtime.replies import optional_text
from miles.runtime.run_record import ManifestsPort
from miles.runtime.store import RunKeys


class Manifest(msgspec.Struct, kw_only=True):
    """One committed optimizer step: enough to resume from, and to audit what was trained."""

    run_id: str
    step: int
    policy_version: int
    weights_uri: str
    weights_sha256: str
    state_uri: str | None
    """Optimizer moments and RNG state, written every ``trainer.checkpoint_every`` steps: the
    latest full state at or before this step (None before the first one)."""
    state_sha256: str | None
    state_step: int
    batch_ids: list[str]
    task_ids: list[str]
    sample_ids: list[str]
    dataset_cursor: int
    """Training prompts the coordinator had dispatched when the step committed."""
    rng_state: str
    """The trainer's torch CPU generator state after the step (base64)."""
    config_hash: str
    time: float = msgspec.field(default_factory=time.time)
    # What the step did: read by `miles status`, the live view and the run summary.
    samples: int
    min_sample_version: int
    reward_mean: float
    metrics: dict[str, float]
    seconds: dict[str, float]
    reward_histogram: dict[str, int] = {}
    """The batch's rewards counted per bucket of ``miles_reward`` (upper bound -> count, not
    cumulative): the reward distribution over steps that `miles report` plots."""
    turns: dict[str, int] = {}
    """The batch's turns counted per role (``assistant``, ``tool``...; empty when no sample had
    turns): with ``samples``, how often a multi-turn policy calls its tools, step by step."""


class CommitRefused(RuntimeError):
    """The commit would break an invariant; ``reason`` says which."""

    def __init__(self, reason: str, latest: int) -> None:
        super().__init__(f"step commit refused: {reason} (latest committed step is {latest})")
        self.reason = reason
        self.latest = latest


_COMMIT = """
local latest = tonumber(redis.call('GET', KEYS[2]) or '0')
local step = tonumber(ARGV[1])
for i = 5, #ARGV do
  if redis.call('SISMEMBER', KEYS[3], ARGV[i]) == 1 then return {'trained', latest} end
end
if step ~= latest + 1 then return {'not_next', latest} end
if not redis.call('SET', KEYS[1], ARGV[2], 'NX') then return {'exists', latest} end
redis.call('SET', KEYS[2], step)
for i = 5, #ARGV do redis.call('SADD', KEYS[3], ARGV[i]) end
redis.call('HSET', KEYS[4], 'step', step, 'policy_version', step)
redis.call('HINCRBY', KEYS[4], 'trained_groups', tonumber(ARGV[3]))
redis.call('HINCRBY', KEYS[4], 'trained_samples', tonumber(ARGV[4]))
return {'ok', step}
"""

_LIVE_LEASES = """
local held = {}
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. member) == 1 then
    held[#held + 1] = string.match(member, '^(%d+):')
  else
    redis.call('SREM', KEYS[1], member)
  end
end
return held
"""

_CONDEMN = """
local held = {}
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. member) == 1 then
    held[string.match(member, '^(%d+):')] = true
  end
end
local marked = {}
for i = 2, #ARGV do
  if not held[ARGV[i]] then
    redis.call('SADD', KEYS[2], ARGV[i])
    marked[#marked + 1] = ARGV[i]
  end
end
return marked
"""

_LEASE = """
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return 0 end
redis.call('SET', KEYS[3], '1', 'PX', ARGV[3])
redis.call('SADD', KEYS[1], ARGV[2])
return 1
"""


class Manifests(ManifestsPort):
    """The manifests of one run in Redis (``run_record.ManifestsPort``)."""

    def __init__(self, client: aioredis.Redis, run_id: str) -> None:
        self.redis = client
        self.keys = RunKeys(run_id)
        self._commit = client.register_script(_COMMIT)
        self._live_leases = client.register_script(_LIVE_LEASES)
        self._condemn = client.register_script(_CONDEMN)
        self._lease = client.register_script(_LEASE)

    async def commit(self, manifest: Manifest) -> None:
        """Write the manifest once and move ``latest`` to it, or raise ``CommitRefused``."""
        keys = [
            self.keys.manifest(manifest.step),
            self.keys.latest,
            self.keys.trained,
            self.keys.record,
        ]
        args: list[Any] = [
            manifest.step,
            msgspec.json.encode(manifest).decode(),
            len(manifest.task_ids),
            len(manifest.sample_ids),
            *manifest.batch_ids,
        ]
        outcome, latest = await self._commit(keys=keys, args=args)
        if outcome != "ok":
            raise CommitRefused(outcome, int(latest))

    async def latest_step(self) -> int:
        return int(optional_text(await self.redis.get(self.keys.latest)) or 0)

    async def latest(self) -> Manifest | None:
        step = await self.latest_step()
        return await self.get(step) if step else None

    async def get(self, step: int) -> Manifest | None:
        raw = await self.redis.get(self.keys.manifest(step))
        return None if raw is None else msgspec.json.decode(raw, type=Manifest)

    async def all(self) -> list[Manifest]:
        """Every committed manifest, step 1 to latest."""
        latest = await self.latest_step()
        if not latest:
            return []
        rows = await self.redis.mget([self.keys.manifest(s) for s in range(1, latest + 1)])
        return [msgspec.json.decode(row, type=Manifest) for row in rows if row is not None]

    async def trained(self, batch_id: str) -> bool:
        return bool(await self.redis.sismember(self.keys.trained, batch_id))

    async def step_of(self, batch_id: str) -> Manifest | None:
        """The committed step that consumed ``batch_id`` (a redelivered batch re-announces it)."""
        for manifest in reversed(await self.all()):
            if batch_id in manifest.batch_ids:
                return manifest
        return None

    async def lease(self, step: int, holder: str, seconds: float) -> bool:
        keys = self.keys
        member = f"{step}:{holder}"
        leased = await self._lease(
            keys=[keys.leases, keys.collected, keys.lease(member)],
            args=[step, member, max(1, int(seconds * 1000))],
        )
        return bool(leased)

    async def release(self, step: int, holder: str) -> None:
        member = f"{step}:{holder}"
        await self.redis.delete(self.keys.lease(member))
        await self.redis.srem(self.keys.leases, member)

    async def leased(self) -> set[int]:
        held = await self._live_leases(keys=[self.keys.leases], args=[self.keys.lease("")])
        return {int(step) for step in held}

    async def condemn(self, steps: list[int]) -> list[int]:
        if not steps:
            return []
        marked = await self._condemn(
            keys=[self.keys.leases, self.keys.collected], args=[self.keys.lease(""), *steps]
        )
        return sorted(int(step) for step in marked)

    async def collected(self, step: int) -> bool:
        return bool(await self.redis.sismember(self.keys.collected, str(step)))

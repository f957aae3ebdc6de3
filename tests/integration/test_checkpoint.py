"""Checkpoint manifests as Redis stores them. The commit's refusals and exactly-once behaviour,
for the Lua script and its in-memory twin alike, are the contract suite's
(tests/contract/test_run_record.py); here, what the script leaves in Redis."""

from __future__ import annotations

import uuid

import msgspec
import pytest
from contract.record_harness import manifest
from redis.asyncio import Redis

from miles.runtime.checkpoint import Manifest, Manifests
from miles.runtime.store import RunStore

pytestmark = pytest.mark.integration


@pytest.fixture
async def manifests(redis_client: Redis) -> Manifests:
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    await RunStore(redis_client, run_id).create_run("h", "{}")
    return Manifests(redis_client, run_id)


async def test_a_commit_leaves_its_manifest_latest_ledger_and_counters(
    manifests: Manifests,
) -> None:
    run_id = manifests.keys.record.rsplit(":", 1)[-1]
    first, second = manifest(run_id, 1, "b-1"), manifest(run_id, 2, "b-2")
    await manifests.commit(first)
    await manifests.commit(second)
    raw = await manifests.redis.get(manifests.keys.manifest(1))
    assert msgspec.json.decode(raw, type=Manifest) == first
    assert await manifests.redis.get(manifests.keys.latest) == "2"
    assert await manifests.redis.smembers(manifests.keys.trained) == {"b-1", "b-2"}
    record = await manifests.redis.hgetall(manifests.keys.record)
    assert (record["step"], record["policy_version"]) == ("2", "2")
    assert (record["trained_groups"], record["trained_samples"]) == ("4", "6")

"""Checkpoint manifests against a real redis-server: written once, `latest` moves by CAS only."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.asyncio import Redis

from miles.runtime.checkpoint import CommitRefused, Manifest, Manifests
from miles.runtime.store import RunStore

pytestmark = pytest.mark.integration


def manifest(run_id: str, step: int, batch_id: str, uri: str = "file:///w") -> Manifest:
    return Manifest(
        run_id=run_id,
        step=step,
        policy_version=step,
        weights_uri=uri,
        weights_sha256="0" * 64,
        state_uri=None,
        state_sha256=None,
        state_step=0,
        batch_ids=[batch_id],
        task_ids=[f"t{step}a", f"t{step}b"],
        sample_ids=[f"t{step}a/0", f"t{step}a/1", f"t{step}b/0"],
        dataset_cursor=2 * step,
        rng_state="AA==",
        config_hash="h",
        samples=3,
        min_sample_version=step - 1,
        reward_mean=0.5,
        metrics={"loss": 0.1},
        seconds={"train": 0.2},
    )


@pytest.fixture
async def manifests(redis_client: Redis) -> Manifests:
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    await RunStore(redis_client, run_id).create_run("h", "{}")
    return Manifests(redis_client, run_id)


async def test_commit_moves_latest_and_the_run_record(manifests: Manifests) -> None:
    run_id = manifests.keys.record.rsplit(":", 1)[-1]
    assert await manifests.latest() is None
    await manifests.commit(manifest(run_id, 1, "b-1"))
    await manifests.commit(manifest(run_id, 2, "b-2"))
    assert [m.step for m in await manifests.all()] == [1, 2]
    latest = await manifests.latest()
    assert latest is not None and latest.batch_ids == ["b-2"] and latest.dataset_cursor == 4
    assert await manifests.trained("b-1") and not await manifests.trained("b-3")
    record = await manifests.redis.hgetall(manifests.keys.record)
    assert (record["step"], record["policy_version"]) == ("2", "2")
    assert (record["trained_groups"], record["trained_samples"]) == ("4", "6")
    found = await manifests.step_of("b-1")
    assert found is not None and found.step == 1


@pytest.mark.parametrize(
    ("step", "batch_id", "reason"),
    [
        (2, "b-1", "trained"),  # a redelivered batch: never trained twice
        (1, "b-9", "not_next"),  # backwards
        (3, "b-9", "not_next"),  # a gap
    ],
)
async def test_refused_commits_change_nothing(
    manifests: Manifests, step: int, batch_id: str, reason: str
) -> None:
    run_id = manifests.keys.record.rsplit(":", 1)[-1]
    await manifests.commit(manifest(run_id, 1, "b-1"))
    before = await manifests.redis.hgetall(manifests.keys.record)
    with pytest.raises(CommitRefused) as refused:
        await manifests.commit(manifest(run_id, step, batch_id))
    assert (refused.value.reason, refused.value.latest) == (reason, 1)
    assert await manifests.latest_step() == 1
    assert [m.batch_ids for m in await manifests.all()] == [["b-1"]]
    assert await manifests.redis.hgetall(manifests.keys.record) == before


async def test_a_manifest_is_written_once(manifests: Manifests) -> None:
    """Even with `latest` behind (as if its move were lost), SET NX keeps the first manifest."""
    run_id = manifests.keys.record.rsplit(":", 1)[-1]
    await manifests.redis.set(manifests.keys.manifest(1), b'{"step": 1}')
    with pytest.raises(CommitRefused, match="exists"):
        await manifests.commit(manifest(run_id, 1, "b-1"))
    assert await manifests.redis.get(manifests.keys.manifest(1)) == '{"step": 1}'
    assert await manifests.latest_step() == 0


async def test_racing_trainers_commit_each_step_once(manifests: Manifests) -> None:
    """Two writers race for the same steps: every step has one winner, no step is skipped."""
    run_id = manifests.keys.record.rsplit(":", 1)[-1]

    async def writer(name: str) -> list[int]:
        won = []
        for step in range(1, 21):
            try:
                await manifests.commit(manifest(run_id, step, f"b-{step}-{name}", uri=name))
                won.append(step)
            except CommitRefused:
                pass
        return won

    a, b = await asyncio.gather(writer("a"), writer("b"))
    assert sorted(a + b) == list(range(1, 21))
    committed = await manifests.all()
    assert [m.step for m in committed] == list(range(1, 21))
    for m in committed:
        assert m.weights_uri == ("a" if m.step in a else "b")

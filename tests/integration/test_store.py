"""The run record against a real redis-server: idempotent creation, exactly-once step commits."""

import uuid

import pytest
from redis.asyncio import Redis

from miles import events
from miles.runtime.store import BatchPlan, RunStore, list_runs

pytestmark = pytest.mark.integration


@pytest.fixture
def store(redis_client: Redis) -> RunStore:
    return RunStore(redis_client, f"run-{uuid.uuid4().hex[:8]}")


async def test_create_run_is_idempotent_for_one_config(store: RunStore) -> None:
    assert await store.create_run("hash-a", '{"lr": 1}') is True
    run = await store.run()
    assert run["status"] == "running"
    assert run["step"] == "0"
    assert run["policy_version"] == "0"
    started = run["started"]
    await store.update(cursor=5)
    assert await store.create_run("hash-a", '{"lr": 1}') is False  # a restarted coordinator
    run = await store.run()
    assert run["cursor"] == "5"  # a restart does not reset the run
    assert run["started"] == started
    assert await store.redis.get(store.keys.config) == '{"lr": 1}'
    assert store.run_id in await list_runs(store.redis)


async def test_create_run_refuses_another_config(store: RunStore) -> None:
    await store.create_run("hash-a", "{}")
    with pytest.raises(ValueError, match="hash-a"):
        await store.create_run("hash-b", "{}")
    assert (await store.run())["config_hash"] == "hash-a"


async def test_heartbeats_are_listed(store: RunStore) -> None:
    for service, instance, processed in [("reward", "h-1", 3), ("reward", "h-2", 4)]:
        await store.heartbeat(
            events.Heartbeat(
                run_id=store.run_id,
                policy_version=-1,
                service=service,
                instance=instance,
                pid=1,
                time=100.0,
                busy_seconds=1.0,
                wait_seconds=2.0,
                processed=processed,
            )
        )
    await store.heartbeat(  # a later beat of the same instance replaces the earlier one
        events.Heartbeat(
            run_id=store.run_id,
            policy_version=-1,
            service="reward",
            instance="h-1",
            pid=1,
            time=101.0,
            busy_seconds=1.5,
            wait_seconds=2.0,
            processed=5,
        )
    )
    services = await store.services()
    assert set(services) == {"reward/h-1", "reward/h-2"}
    assert services["reward/h-1"]["processed"] == 5
    assert services["reward/h-1"]["time"] == 101.0
    assert services["reward/h-2"]["processed"] == 4


async def test_counters(store: RunStore) -> None:
    await store.count_dead_letter("pickle")
    await store.count_dead_letter("pickle")
    assert await store.record_filtered("t1", "stale") is True
    assert await store.record_filtered("t1", "stale") is False  # a redelivered group: once
    assert await store.record_filtered("t2", "zero_variance") is True
    assert await store.dead_letters() == {"pickle": 2}
    assert await store.filtered() == {"stale": 1, "zero_variance": 1}
    assert await store.filtered_groups() == 2


async def test_batch_plans_survive_for_a_restarted_buffer(store: RunStore) -> None:
    assert await store.batch_plans(["t1", "t2", "t3"]) == {}
    await store.plan_batch("b-1", ["t1", "t2"])
    plans = await store.batch_plans(["t1", "t3", "t2"])
    planned = BatchPlan("b-1", ["t1", "t2"], published=False)
    assert plans == {"t1": planned, "t2": planned}
    await store.mark_published("b-1", ["t1", "t2"])
    assert (await store.batch_plans(["t2"]))["t2"] == BatchPlan("b-1", ["t1", "t2"], True)

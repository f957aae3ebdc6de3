"""The run record as Redis stores it. What the record does (for Redis and its in-memory twin
alike) is the contract suite's: tests/contract/test_run_record.py; here, what lands in Redis,
which `miles status` of another version, the chaos audit and an operator's redis-cli read."""

import json
import uuid

import msgspec
import pytest
from redis.asyncio import Redis

from miles import events
from miles.runtime.run_record import EvalResult
from miles.runtime.store import RunStore, list_runs

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


async def test_rows_are_json_with_the_fields_of_their_structs(store: RunStore) -> None:
    """An evaluation is one JSON object per row, its fields in order (what ``summarize`` wrote
    as a dict before ``EvalResult``); a heartbeat is the event's JSON, kind tag included."""
    await store.add_eval(
        EvalResult(
            round=2,
            after_step=2,
            policy_versions=[1, 2],
            accuracy=0.5,
            reward_mean=0.25,
            n=3,
            expected=4,
            time=12.5,
        )
    )
    [row] = await store.redis.lrange(store.keys.evals, 0, -1)
    assert row == (
        '{"round":2,"after_step":2,"policy_versions":[1,2],"accuracy":0.5,'
        '"reward_mean":0.25,"n":3,"expected":4,"time":12.5,"examples":[]}'
    )
    beat = events.Heartbeat(
        run_id=store.run_id,
        policy_version=-1,
        service="buffer",
        instance="h-1",
        pid=7,
        time=100.0,
        busy_seconds=1.0,
        wait_seconds=2.0,
        processed=3,
    )
    await store.heartbeat(beat)
    stored = json.loads(await store.redis.hget(store.keys.services, "buffer/h-1"))
    assert stored == json.loads(msgspec.json.encode(beat))
    assert stored["kind"] == "heartbeat"

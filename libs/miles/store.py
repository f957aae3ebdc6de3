"""The run record in Redis: what `miles status` reads and what a restarted service resumes from.

Keys, all under ``miles:run:<run_id>``:

- ``(hash)``          config hash, status, step, policy_version, reward and accuracy, times
- ``:config``         the resolved config (JSON)
- ``:steps``          one JSON record per committed step (list, index = step - 1)
- ``:evals``          one JSON record per evaluation (list)
- ``:trained``        batch ids already trained (set): a redelivered batch is a no-op
- ``:services``       instance -> last heartbeat (JSON)
- ``:dead``           reason -> count of dead-lettered inputs
- ``:filtered``       reason -> count of groups the buffer dropped
``miles:runs`` is a sorted set of run ids by start time.
"""

from __future__ import annotations

import json
import time
from typing import Any

import msgspec
import redis.asyncio as aioredis
import redis.exceptions

from miles.bus import Unreachable
from miles.events import Heartbeat

RUNS_KEY = "miles:runs"


class RunKeys:
    """The key layout above, spelled once for the async store and the sync readers."""

    def __init__(self, run_id: str) -> None:
        self.record = f"miles:run:{run_id}"
        self.config = f"{self.record}:config"
        self.steps = f"{self.record}:steps"
        self.evals = f"{self.record}:evals"
        self.trained = f"{self.record}:trained"
        self.services = f"{self.record}:services"
        self.dead = f"{self.record}:dead"
        self.filtered = f"{self.record}:filtered"


async def connect_redis(url: str, timeout: float) -> aioredis.Redis:
    client = aioredis.Redis.from_url(url, socket_connect_timeout=timeout, decode_responses=True)
    try:
        await client.ping()
    except (OSError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        await client.aclose()
        raise Unreachable(
            f"cannot reach Redis at {url} ({type(exc).__name__}); start redis-server and set "
            "REDIS_URL, or unset it to run an embedded one"
        ) from exc
    return client


class RunStore:
    def __init__(self, client: aioredis.Redis, run_id: str) -> None:
        self.redis = client
        self.run_id = run_id
        self.keys = RunKeys(run_id)

    async def create_run(self, config_hash: str, config_json: str) -> bool:
        """Record a new run; False when it exists already (a restarted coordinator)."""
        now = time.time()
        created = await self.redis.hsetnx(self.keys.record, "config_hash", config_hash)
        if created:
            await self.redis.hset(
                self.keys.record,
                mapping={
                    "run_id": self.run_id,
                    "status": "running",
                    "started": now,
                    "step": 0,
                    "policy_version": 0,
                },
            )
            await self.redis.set(self.keys.config, config_json)
            await self.redis.zadd(RUNS_KEY, {self.run_id: now})
        else:
            existing = await self.redis.hget(self.keys.record, "config_hash")
            if existing != config_hash:
                raise ValueError(
                    f"run {self.run_id} exists with config {existing}, not {config_hash}"
                )
        return bool(created)

    async def run(self) -> dict[str, str]:
        return await self.redis.hgetall(self.keys.record)

    async def update(self, **fields: Any) -> None:
        await self.redis.hset(self.keys.record, mapping={k: _scalar(v) for k, v in fields.items()})

    async def status(self) -> str | None:
        return await self.redis.hget(self.keys.record, "status")

    async def policy_version(self) -> int:
        return int(await self.redis.hget(self.keys.record, "policy_version") or 0)

    async def commit_step(self, step: int, record: dict[str, Any], batch_id: str) -> bool:
        """Append the step record, mark its batch trained and move the version, atomically.

        Returns False when the batch was trained already (a redelivery); nothing changes then.
        """
        async with self.redis.pipeline(transaction=True) as pipe:
            await pipe.watch(self.keys.trained)
            if await pipe.sismember(self.keys.trained, batch_id):
                return False
            pipe.multi()
            pipe.sadd(self.keys.trained, batch_id)
            pipe.rpush(self.keys.steps, json.dumps(record))
            pipe.hset(self.keys.record, mapping={"step": step, "policy_version": step})
            await pipe.execute()
        return True

    async def trained(self, batch_id: str) -> bool:
        return bool(await self.redis.sismember(self.keys.trained, batch_id))

    async def steps(self) -> list[dict[str, Any]]:
        return [json.loads(row) for row in await self.redis.lrange(self.keys.steps, 0, -1)]

    async def add_eval(self, record: dict[str, Any]) -> None:
        await self.redis.rpush(self.keys.evals, json.dumps(record))

    async def heartbeat(self, beat: Heartbeat) -> None:
        key = f"{beat.service}/{beat.instance}"
        await self.redis.hset(self.keys.services, key, msgspec.json.encode(beat).decode())

    async def services(self) -> dict[str, dict[str, Any]]:
        rows = await self.redis.hgetall(self.keys.services)
        return {key: json.loads(value) for key, value in rows.items()}

    async def count_dead_letter(self, reason: str) -> None:
        await self.redis.hincrby(self.keys.dead, reason, 1)

    async def dead_letters(self) -> dict[str, int]:
        return {k: int(v) for k, v in (await self.redis.hgetall(self.keys.dead)).items()}

    async def count_filtered(self, reason: str) -> None:
        await self.redis.hincrby(self.keys.filtered, reason, 1)

    async def filtered(self) -> dict[str, int]:
        return {k: int(v) for k, v in (await self.redis.hgetall(self.keys.filtered)).items()}


async def list_runs(client: aioredis.Redis) -> list[str]:
    return list(await client.zrange(RUNS_KEY, 0, -1))


def _scalar(value: Any) -> str | int | float:
    if isinstance(value, (int, float, str)):
        return value
    return json.dumps(value)

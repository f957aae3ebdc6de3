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
        self.key = f"miles:run:{run_id}"

    async def create_run(self, config_hash: str, config_json: str) -> bool:
        """Record a new run; False when it exists already (a restarted coordinator)."""
        now = time.time()
        created = await self.redis.hsetnx(self.key, "config_hash", config_hash)
        if created:
            await self.redis.hset(
                self.key,
                mapping={
                    "run_id": self.run_id,
                    "status": "running",
                    "started": now,
                    "step": 0,
                    "policy_version": 0,
                },
            )
            await self.redis.set(f"{self.key}:config", config_json)
            await self.redis.zadd("miles:runs", {self.run_id: now})
        else:
            existing = await self.redis.hget(self.key, "config_hash")
            if existing != config_hash:
                raise ValueError(
                    f"run {self.run_id} exists with config {existing}, not {config_hash}"
                )
        return bool(created)

    async def run(self) -> dict[str, str]:
        return await self.redis.hgetall(self.key)

    async def update(self, **fields: Any) -> None:
        await self.redis.hset(self.key, mapping={k: _scalar(v) for k, v in fields.items()})

    async def status(self) -> str | None:
        return await self.redis.hget(self.key, "status")

    async def policy_version(self) -> int:
        return int(await self.redis.hget(self.key, "policy_version") or 0)

    async def commit_step(self, step: int, record: dict[str, Any], batch_id: str) -> bool:
        """Append the step record, mark its batch trained and move the version, atomically.

        Returns False when the batch was trained already (a redelivery); nothing changes then.
        """
        async with self.redis.pipeline(transaction=True) as pipe:
            await pipe.watch(f"{self.key}:trained")
            if await pipe.sismember(f"{self.key}:trained", batch_id):
                return False
            pipe.multi()
            pipe.sadd(f"{self.key}:trained", batch_id)
            pipe.rpush(f"{self.key}:steps", json.dumps(record))
            pipe.hset(self.key, mapping={"step": step, "policy_version": step})
            await pipe.execute()
        return True

    async def trained(self, batch_id: str) -> bool:
        return bool(await self.redis.sismember(f"{self.key}:trained", batch_id))

    async def steps(self) -> list[dict[str, Any]]:
        return [json.loads(row) for row in await self.redis.lrange(f"{self.key}:steps", 0, -1)]

    async def add_eval(self, record: dict[str, Any]) -> None:
        await self.redis.rpush(f"{self.key}:evals", json.dumps(record))

    async def evals(self) -> list[dict[str, Any]]:
        return [json.loads(row) for row in await self.redis.lrange(f"{self.key}:evals", 0, -1)]

    async def heartbeat(self, beat: Heartbeat) -> None:
        key = f"{beat.service}/{beat.instance}"
        await self.redis.hset(f"{self.key}:services", key, msgspec.json.encode(beat).decode())

    async def services(self) -> dict[str, dict[str, Any]]:
        rows = await self.redis.hgetall(f"{self.key}:services")
        return {key: json.loads(value) for key, value in rows.items()}

    async def count_dead_letter(self, reason: str) -> None:
        await self.redis.hincrby(f"{self.key}:dead", reason, 1)

    async def dead_letters(self) -> dict[str, int]:
        return {k: int(v) for k, v in (await self.redis.hgetall(f"{self.key}:dead")).items()}

    async def count_filtered(self, reason: str) -> None:
        await self.redis.hincrby(f"{self.key}:filtered", reason, 1)

    async def filtered(self) -> dict[str, int]:
        return {k: int(v) for k, v in (await self.redis.hgetall(f"{self.key}:filtered")).items()}

    async def incr(self, field: str, amount: float = 1) -> None:
        await self.redis.hincrbyfloat(self.key, field, amount)


async def list_runs(client: aioredis.Redis) -> list[str]:
    return list(await client.zrange("miles:runs", 0, -1))


def _scalar(value: Any) -> str | int | float:
    if isinstance(value, (int, float, str)):
        return value
    return json.dumps(value)

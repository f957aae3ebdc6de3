"""The run record in Redis: what `miles status` reads and what a restarted service resumes from.

Keys, all under ``miles:run:<run_id>``:

- ``(hash)``          config hash, status, step, policy_version, reward and accuracy, times
- ``:config``         the resolved config (JSON)
- ``:manifest:<n>``   the checkpoint manifest of step n, written once (see checkpoint.py)
- ``:latest``         the last committed step; moves by compare-and-set only
- ``:trained``        batch ids already trained (set): a redelivered batch is a no-op
- ``:batched``        task id -> the batch id the buffer put its group in (hash)
- ``:batches``        batch id -> its task ids in order, and whether it was published (hash)
- ``:evals``          one JSON record per evaluation (list)
- ``:services``       instance -> last heartbeat (JSON)
- ``:dead``           reason -> count of dead-lettered inputs
- ``:filtered``       reason -> count of groups the buffer dropped
- ``:filtered_tasks`` task id -> why the buffer dropped its group (hash; counted once)
- ``:restarts``       service -> how often `miles run` restarted it (the coordinator exports it)
- ``:stragglers``     engine -> how often it was flagged as a straggler
- ``:engines``        engine -> its base URL (a push: rollout.weight_sync != "blob")
- ``:collected``      steps whose weights the trainer collected or is collecting (set)
- ``:leases``         ``<step>:<holder>`` of every export lease (set); each lease is the key
                      ``:lease:<step>:<holder>``, which expires
``miles:runs`` is a sorted set of run ids by start time.

``RunStore`` implements ``run_record.RunStorePort`` (``memory_store.MemoryRunStore`` is its
in-memory twin); ``checkpoint.Manifests`` holds the manifests, the ledger and ``latest``.
"""

from __future__ import annotations

import logging
import time

import msgspec
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff

from miles.config import OUTAGE_TOLERANCE_SECONDS
from miles.events import Heartbeat
from miles.runtime.bus import Unreachable
from miles.runtime.replies import counts, members, optional_text, text, text_map
from miles.runtime.run_record import BatchPlan, EvalResult, RunRecord, RunStorePort, Scalar

log = logging.getLogger(__name__)
RUNS_KEY = "miles:runs"

_RECORD_FILTERED = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
  return 1
end
return 0
"""


_PLAN = msgspec.json.Decoder(BatchPlan)
_EVAL = msgspec.json.Decoder(EvalResult)
_HEARTBEAT = msgspec.json.Decoder(Heartbeat)


class RunKeys:
    """The key layout above, spelled once for the async store and the sync readers."""

    def __init__(self, run_id: str) -> None:
        self.record = f"miles:run:{run_id}"
        self.config = f"{self.record}:config"
        self.latest = f"{self.record}:latest"
        self.trained = f"{self.record}:trained"
        self.batched = f"{self.record}:batched"
        self.batches = f"{self.record}:batches"
        self.evals = f"{self.record}:evals"
        self.services = f"{self.record}:services"
        self.dead = f"{self.record}:dead"
        self.filtered = f"{self.record}:filtered"
        self.filtered_tasks = f"{self.record}:filtered_tasks"
        self.restarts = f"{self.record}:restarts"
        self.stragglers = f"{self.record}:stragglers"
        self.engines = f"{self.record}:engines"
        self.collected = f"{self.record}:collected"
        self.leases = f"{self.record}:leases"

    def manifest(self, step: int) -> str:
        return f"{self.record}:manifest:{step}"

    def lease(self, member: str) -> str:
        """The expiring key of lease ``<step>:<holder>`` (``""``: the prefix of them all)."""
        return f"{self.record}:lease:{member}"


REDIS_OUTAGE_SECONDS = OUTAGE_TOLERANCE_SECONDS
"""How long a service rides out an unreachable Redis (a restart replaying its AOF) before its
calls raise and the supervisor restarts it."""


class _LoggedBackoff(ExponentialBackoff):
    """Exponential backoff that says, once per retry, that Redis is away and for how long."""

    def compute(self, failures: int) -> float:
        delay = super().compute(failures)
        log.warning("Redis unreachable (attempt %d); retrying in %.1fs", failures, delay)
        return delay


async def connect_redis(url: str, timeout: float) -> aioredis.Redis:
    cap = 2.0
    client = aioredis.Redis.from_url(
        url,
        socket_connect_timeout=timeout,
        decode_responses=True,
        retry=Retry(_LoggedBackoff(cap=cap, base=0.05), retries=int(REDIS_OUTAGE_SECONDS / cap)),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
    )
    try:
        await _ping_once(url, timeout)
    except (OSError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        await client.aclose()
        raise Unreachable(
            f"cannot reach Redis at {url} ({type(exc).__name__}); start redis-server and set "
            "REDIS_URL, or unset it to run an embedded one"
        ) from exc
    return client


async def _ping_once(url: str, timeout: float) -> None:
    """A first contact without retries: a wrong URL fails in seconds, not minutes."""
    probe = aioredis.Redis.from_url(
        url, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
    )
    try:
        await probe.ping()
    finally:
        await probe.aclose()


class RunStore(RunStorePort):
    """One run's record in Redis (``run_record.RunStorePort``)."""

    def __init__(self, client: aioredis.Redis, run_id: str) -> None:
        self.redis = client
        self.run_id = run_id
        self.keys = RunKeys(run_id)
        self._filter = client.register_script(_RECORD_FILTERED)

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
            existing = optional_text(await self.redis.hget(self.keys.record, "config_hash"))
            if existing != config_hash:
                raise ValueError(
                    f"run {self.run_id} exists with config {existing}, not {config_hash}"
                )
        return bool(created)

    async def run(self) -> dict[str, str]:
        """The hash as Redis holds it, strings: for audits that read the storage itself.
        Services read ``record()``."""
        return text_map(await self.redis.hgetall(self.keys.record))

    async def record(self) -> RunRecord:
        return RunRecord.decode(await self.run())

    async def update(self, **fields: Scalar) -> None:
        RunRecord.check(fields)
        # A comprehension, not dict(fields): redis-py's mapping type is invariant in its key.
        await self.redis.hset(self.keys.record, mapping={k: v for k, v in fields.items()})

    async def status(self) -> str | None:
        return optional_text(await self.redis.hget(self.keys.record, "status"))

    async def policy_version(self) -> int:
        return int(optional_text(await self.redis.hget(self.keys.record, "policy_version")) or 0)

    async def add_eval(self, result: EvalResult) -> None:
        await self.redis.rpush(self.keys.evals, msgspec.json.encode(result).decode())

    async def evals(self) -> list[EvalResult]:
        return [_EVAL.decode(row) for row in await self.redis.lrange(self.keys.evals, 0, -1)]

    async def heartbeat(self, beat: Heartbeat) -> None:
        key = f"{beat.service}/{beat.instance}"
        await self.redis.hset(self.keys.services, key, msgspec.json.encode(beat).decode())

    async def services(self) -> dict[str, Heartbeat]:
        rows = await self.redis.hgetall(self.keys.services)
        return {text(key): _HEARTBEAT.decode(value) for key, value in rows.items()}

    async def count_dead_letter(self, reason: str) -> None:
        await self.redis.hincrby(self.keys.dead, reason, 1)

    async def dead_letters(self) -> dict[str, int]:
        return counts(await self.redis.hgetall(self.keys.dead))

    async def restarts(self) -> dict[str, int]:
        return counts(await self.redis.hgetall(self.keys.restarts))

    async def register_engines(self, urls: dict[str, str]) -> None:
        """Engine name -> base URL, for a trainer that broadcasts weights into them."""
        if urls:
            await self.redis.hset(self.keys.engines, mapping={k: v for k, v in urls.items()})

    async def forget_engines(self, names: list[str]) -> None:
        if names:
            await self.redis.hdel(self.keys.engines, *names)

    async def engine_urls(self) -> list[str]:
        return sorted(set(text_map(await self.redis.hgetall(self.keys.engines)).values()))

    async def count_straggler(self, engine: str) -> None:
        await self.redis.hincrby(self.keys.stragglers, engine, 1)

    async def stragglers(self) -> dict[str, int]:
        return counts(await self.redis.hgetall(self.keys.stragglers))

    async def record_filtered(self, task_id: str, reason: str) -> bool:
        """Remember why a group was dropped; counted once however often it is redelivered."""
        first = await self._filter(
            keys=[self.keys.filtered_tasks, self.keys.filtered], args=[task_id, reason]
        )
        return bool(first)

    async def filtered(self) -> dict[str, int]:
        return counts(await self.redis.hgetall(self.keys.filtered))

    async def filtered_groups(self) -> int:
        return int(await self.redis.hlen(self.keys.filtered_tasks))

    async def plan_batch(self, batch_id: str, task_ids: list[str]) -> None:
        """Record a batch's groups before it is published, so a restarted buffer rebuilds it."""
        plan = msgspec.json.encode(BatchPlan(batch_id, task_ids, published=False)).decode()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(self.keys.batches, batch_id, plan)
            pipe.hset(self.keys.batched, mapping={task_id: batch_id for task_id in task_ids})
            await pipe.execute()

    async def mark_published(self, batch_id: str, task_ids: list[str]) -> None:
        plan = msgspec.json.encode(BatchPlan(batch_id, task_ids, published=True)).decode()
        await self.redis.hset(self.keys.batches, batch_id, plan)

    async def batch_plans(self, task_ids: list[str]) -> dict[str, BatchPlan]:
        """task id -> the plan of the batch it is in, for the tasks already batched."""
        if not task_ids:
            return {}
        owners = [optional_text(b) for b in await self.redis.hmget(self.keys.batched, task_ids)]
        batch_ids = sorted({b for b in owners if b is not None})
        if not batch_ids:
            return {}
        found = await self.redis.hmget(self.keys.batches, batch_ids)
        plans = {b: _PLAN.decode(raw) for b, raw in zip(batch_ids, found, strict=True) if raw}
        return {
            task_id: plans[batch_id]
            for task_id, batch_id in zip(task_ids, owners, strict=True)
            if batch_id in plans
        }


async def list_runs(client: aioredis.Redis) -> list[str]:
    return members(await client.zrange(RUNS_KEY, 0, -1))

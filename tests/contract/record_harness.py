"""The run record contract's harnesses: Redis ("redis", an integration test) and the in-memory
twins ("memory", milliseconds).

A harness connects "processes" to one run's record (each with its own store and manifests, on
its own Redis connection or on the shared ``MemoryRun``) and writes what no service writes
through the port: a restart counted by `miles run`, a manifest planted under the commit.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis

from miles.runtime.checkpoint import Manifest, Manifests
from miles.runtime.memory_store import MemoryManifests, MemoryRun, MemoryRunStore
from miles.runtime.run_record import ManifestsPort, RunStorePort
from miles.runtime.store import RunKeys, RunStore, connect_redis


@dataclass
class Client:
    """One process's view of the run record."""

    store: RunStorePort
    manifests: ManifestsPort


class RecordHarness(Protocol):
    run_id: str

    async def connect(self) -> Client: ...

    async def count_restart(self, service: str) -> None:
        """What `miles run` writes when it restarts a service."""
        ...

    async def plant_manifest(self, step: int, raw: bytes) -> None:
        """A manifest written under step ``step`` without the commit (``latest`` stays)."""
        ...

    async def manifest_text(self, step: int) -> str | None:
        """The manifest of ``step`` as stored."""
        ...

    async def close(self) -> None: ...


class RedisRecordHarness:
    def __init__(self, url: str) -> None:
        self.url = url
        self.run_id = f"run-{uuid.uuid4().hex[:8]}"
        self.keys = RunKeys(self.run_id)
        self.clients: list[Redis] = []

    async def _client(self) -> Redis:
        client = await connect_redis(self.url, 5)
        self.clients.append(client)
        return client

    async def connect(self) -> Client:
        client = await self._client()
        return Client(RunStore(client, self.run_id), Manifests(client, self.run_id))

    async def count_restart(self, service: str) -> None:
        await (await self._client()).hincrby(self.keys.restarts, service, 1)

    async def plant_manifest(self, step: int, raw: bytes) -> None:
        await (await self._client()).set(self.keys.manifest(step), raw)

    async def manifest_text(self, step: int) -> str | None:
        return await (await self._client()).get(self.keys.manifest(step))

    async def close(self) -> None:
        for client in self.clients:
            await client.aclose()


class MemoryRecordHarness:
    def __init__(self) -> None:
        self.run_id = f"run-{uuid.uuid4().hex[:8]}"
        self.state = MemoryRun(self.run_id)

    async def connect(self) -> Client:
        return Client(MemoryRunStore(self.state), MemoryManifests(self.state))

    async def count_restart(self, service: str) -> None:
        self.state.restarts[service] += 1

    async def plant_manifest(self, step: int, raw: bytes) -> None:
        self.state.manifests[step] = raw

    async def manifest_text(self, step: int) -> str | None:
        raw = self.state.manifests.get(step)
        return None if raw is None else raw.decode()

    async def close(self) -> None:
        pass


def manifest(run_id: str, step: int, batch_id: str, uri: str = "file:///w") -> Manifest:
    """Step ``step`` of two groups (three samples) from batch ``batch_id``."""
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

"""Collecting old steps against the real thing: manifests and leases in redis-server, weights in
a directory and in JetStream's Object Store. A collection cut short leaves only files the next
one deletes; the kept steps' files stay whole and verified."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from contract.record_harness import manifest
from redis.asyncio import Redis

from miles.config import load_config
from miles.recipe import Recipe
from miles.runtime import embedded, faults
from miles.runtime.bus import MemoryBroker, MemoryBus, NatsBus, connect_nats
from miles.runtime.checkpoint import Manifests
from miles.runtime.memory_store import MemoryRun, MemoryRunStore
from miles.runtime.service import ServiceContext
from miles.shards import WEIGHTS_FILE
from miles.telemetry import Metrics
from miles.weights.blobs import BlobMissing, BlobStore, DirBlobStore, ObjectBlobStore
from services.trainer.collection import collect

pytestmark = pytest.mark.integration


class Crashed(Exception):
    """Stands in for the SIGKILL of ``trainer.mid_gc``."""


@pytest.fixture(params=["dir", "nats"])
async def blobs(
    request: pytest.FixtureRequest, tmp_path: Path, nats_server: embedded.Server
) -> AsyncIterator[BlobStore]:
    if request.param == "dir":
        yield DirBlobStore(tmp_path / "blobs")
        return
    nc = await connect_nats(nats_server.url, 5, "gc-test")
    run_id = f"gc-{uuid.uuid4().hex[:6]}"
    yield ObjectBlobStore(
        NatsBus(nc, run_id, "trainer", 8 << 20), f"miles_{run_id}_blobs", tmp_path
    )
    await nc.close()


def context(tmp_path: Path, client: Redis, run_id: str) -> ServiceContext:
    config = load_config(overrides=["trainer.keep_checkpoints=2", "buffer.max_staleness=0"])
    recipe = Recipe(path=tmp_path / "recipe.py", config=config, rewards={})
    return ServiceContext(
        "trainer",
        config,
        recipe,
        run_id,
        tmp_path,
        MemoryBus(MemoryBroker(), run_id, "trainer"),
        MemoryRunStore(MemoryRun(run_id)),
        Manifests(client, run_id),
        Metrics("trainer", run_id),
    )


async def commit_steps(ctx: ServiceContext, blobs: BlobStore, steps: int) -> None:
    for step in range(1, steps + 1):
        uris = []
        for name in (f"weights/v{step}-a", f"state/s{step}-a"):
            staging = ctx.run_dir / "staging" / name.replace("/", "_")
            staging.mkdir(parents=True)
            (staging / WEIGHTS_FILE).write_bytes(name.encode() * 50_000)  # several chunks
            (staging / "config.json").write_text("{}")
            uris.append(await blobs.put_dir(staging, name))
        sha = hashlib.sha256(f"weights/v{step}-a".encode() * 50_000).hexdigest()
        committed = msgspec.structs.replace(
            manifest(ctx.run_id, step, f"b{step}", uris[0]),
            weights_sha256=sha,
            state_uri=uris[1],
            state_sha256=sha,  # not checked here
            state_step=step,
        )
        await ctx.manifests.commit(committed)


async def held(blobs: BlobStore) -> list[str]:
    return [*await blobs.names("weights"), *await blobs.names("state")]


async def test_a_collection_cut_short_is_finished_and_keeps_what_readers_need(
    tmp_path: Path,
    blobs: BlobStore,
    redis_client: Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_id = f"gc-{uuid.uuid4().hex[:6]}"
    ctx = context(tmp_path, redis_client, run_id)
    await commit_steps(ctx, blobs, 5)
    assert await ctx.manifests.lease(2, "export-x", 60)  # an export reads step 2
    first = await ctx.manifests.get(1)
    assert first is not None
    await blobs.get_dir(first.weights_uri, first.weights_sha256)  # fetched (a cached copy)

    def die(point: str) -> None:
        raise Crashed

    monkeypatch.setattr(faults, "crash_point", die)
    with pytest.raises(Crashed):
        await collect(ctx, blobs)
    assert len(await held(blobs)) == 9  # one of five doomed files went

    monkeypatch.setattr(faults, "crash_point", lambda point: None)
    await collect(ctx, blobs)
    assert await held(blobs) == [
        "weights/v2-a",  # leased
        "weights/v4-a",
        "weights/v5-a",
        "state/s4-a",
        "state/s5-a",
    ]
    for step in (2, 4, 5):
        kept = await ctx.manifests.get(step)
        assert kept is not None
        await blobs.get_dir(kept.weights_uri, kept.weights_sha256)
    with pytest.raises(BlobMissing):
        await blobs.get_dir(first.weights_uri, first.weights_sha256)  # the cached copy went too
    assert not await ctx.manifests.lease(1, "export-y", 60)

    await ctx.manifests.release(2, "export-x")
    await collect(ctx, blobs)
    assert await blobs.names("weights") == ["weights/v4-a", "weights/v5-a"]

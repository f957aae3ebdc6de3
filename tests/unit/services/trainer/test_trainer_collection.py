"""The trainer's collection of old steps over the in-memory run record and a directory blob
store: what stays, a collection cut short and finished by the next, leases, carried states,
crashed attempts, and steps not committed yet."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from contract.record_harness import manifest

from miles.config import load_config
from miles.recipe import Recipe
from miles.runtime import faults
from miles.runtime.bus import MemoryBroker, MemoryBus
from miles.runtime.memory_store import MemoryManifests, MemoryRun, MemoryRunStore
from miles.runtime.service import ServiceContext
from miles.shards import WEIGHTS_FILE, sha256_file
from miles.telemetry import Metrics
from miles.weights.blobs import DirBlobStore
from services.trainer.collection import collect

RUN = "run"


class Crashed(Exception):
    """Stands in for the SIGKILL of ``trainer.mid_gc``."""


def context(tmp_path: Path, *overrides: str) -> ServiceContext:
    config = load_config(overrides=list(overrides))
    run = MemoryRun(RUN)
    recipe = Recipe(path=tmp_path / "recipe.py", config=config, rewards={})
    bus = MemoryBus(MemoryBroker(), RUN, "trainer")
    return ServiceContext(
        "trainer",
        config,
        recipe,
        RUN,
        tmp_path,
        bus,
        MemoryRunStore(run),
        MemoryManifests(run),
        Metrics("trainer", RUN),
    )


async def put(blobs: DirBlobStore, tmp_path: Path, name: str) -> str:
    staging = tmp_path / "staging" / name.replace("/", "_")
    staging.mkdir(parents=True)
    (staging / WEIGHTS_FILE).write_bytes(name.encode())
    return await blobs.put_dir(staging, name)


async def commit(ctx: ServiceContext, blobs: DirBlobStore, step: int, state_every: int = 1) -> None:
    """Step ``step`` as the trainer commits it: its weights, and a full state every
    ``state_every`` steps (else the last one carried over)."""
    weights = await put(blobs, ctx.run_dir, f"weights/v{step}-a")
    committed = manifest(RUN, step, f"b{step}", weights)
    state_step = step - step % state_every
    state_uri = None
    if state_step == step:
        state_uri = await put(blobs, ctx.run_dir, f"state/s{step}-a")
    elif state_step:
        state_uri = (await ctx.manifests.get(state_step)).state_uri  # type: ignore[union-attr]
    sha = sha256_file(Path(weights.removeprefix("file://")) / WEIGHTS_FILE)
    committed = msgspec.structs.replace(
        committed, weights_sha256=sha, state_uri=state_uri, state_step=state_step
    )
    await ctx.manifests.commit(committed)


async def stored(blobs: DirBlobStore) -> list[str]:
    return [*await blobs.names("weights"), *await blobs.names("state")]


async def test_old_steps_go_and_the_kept_ones_stay_whole(tmp_path: Path) -> None:
    ctx = context(tmp_path, "trainer.keep_checkpoints=2", "buffer.max_staleness=0")
    blobs = DirBlobStore(tmp_path / "blobs")
    for step in range(1, 6):
        await commit(ctx, blobs, step)

    deleted = await collect(ctx, blobs)

    assert sorted(blob.name for blob in deleted) == [
        "state/s1-a",
        "state/s2-a",
        "state/s3-a",
        "weights/v1-a",
        "weights/v2-a",
        "weights/v3-a",
    ]
    assert await stored(blobs) == ["weights/v4-a", "weights/v5-a", "state/s4-a", "state/s5-a"]
    latest = await ctx.manifests.latest()
    assert latest is not None
    await blobs.get_dir(latest.weights_uri, latest.weights_sha256)  # whole and verified
    assert await collect(ctx, blobs) == []  # nothing left to do
    assert [await ctx.manifests.collected(step) for step in (3, 4)] == [True, False]


async def test_a_collection_cut_short_is_finished_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = context(tmp_path, "trainer.keep_checkpoints=2")
    blobs = DirBlobStore(tmp_path / "blobs")
    for step in range(1, 5):
        await commit(ctx, blobs, step)

    def die(point: str) -> None:
        assert point == "trainer.mid_gc"
        raise Crashed

    monkeypatch.setattr(faults, "crash_point", die)
    with pytest.raises(Crashed):
        await collect(ctx, blobs)
    assert len(await stored(blobs)) == 7  # one of the four doomed files went

    monkeypatch.setattr(faults, "crash_point", lambda point: None)
    await collect(ctx, blobs)
    assert await stored(blobs) == ["weights/v3-a", "weights/v4-a", "state/s3-a", "state/s4-a"]


async def test_engines_keep_max_staleness_plus_two_versions(tmp_path: Path) -> None:
    ctx = context(tmp_path, "trainer.keep_checkpoints=1", "buffer.max_staleness=2")
    blobs = DirBlobStore(tmp_path / "blobs")
    for step in range(1, 7):
        await commit(ctx, blobs, step)
    await collect(ctx, blobs)
    assert await stored(blobs) == [
        "weights/v3-a",
        "weights/v4-a",
        "weights/v5-a",
        "weights/v6-a",
        "state/s6-a",  # one checkpoint kept whole: the latest
    ]


async def test_a_leased_step_stays_until_released_and_a_collected_one_cannot_be_leased(
    tmp_path: Path,
) -> None:
    ctx = context(tmp_path, "trainer.keep_checkpoints=1")
    blobs = DirBlobStore(tmp_path / "blobs")
    for step in range(1, 4):
        await commit(ctx, blobs, step)
    assert await ctx.manifests.lease(1, "export-1", 60)

    await collect(ctx, blobs)
    assert await blobs.names("weights") == ["weights/v1-a", "weights/v2-a", "weights/v3-a"]
    assert await blobs.names("state") == ["state/s3-a"]  # an export reads weights only

    await ctx.manifests.release(1, "export-1")
    await collect(ctx, blobs)
    assert await blobs.names("weights") == ["weights/v2-a", "weights/v3-a"]
    assert not await ctx.manifests.lease(1, "export-2", 60)


async def test_the_full_state_the_latest_manifest_carries_stays(tmp_path: Path) -> None:
    ctx = context(tmp_path, "trainer.keep_checkpoints=1", "trainer.checkpoint_every=3")
    blobs = DirBlobStore(tmp_path / "blobs")
    for step in range(1, 6):
        await commit(ctx, blobs, step, state_every=3)
    await collect(ctx, blobs)
    assert await blobs.names("state") == ["state/s3-a"]  # step 5 resumes from it


async def test_crashed_attempts_go_and_the_next_steps_files_stay(tmp_path: Path) -> None:
    ctx = context(tmp_path, "trainer.keep_checkpoints=2")
    blobs = DirBlobStore(tmp_path / "blobs")
    for step in range(1, 3):
        await commit(ctx, blobs, step)
    await put(blobs, tmp_path, "weights/v2-crashed")  # an attempt killed before its commit
    await put(blobs, tmp_path, "weights/v3-inflight")  # the attempt under way
    await collect(ctx, blobs)
    assert await blobs.names("weights") == ["weights/v1-a", "weights/v2-a", "weights/v3-inflight"]


async def test_keep_checkpoints_0_keeps_everything(tmp_path: Path) -> None:
    ctx = context(tmp_path, "trainer.keep_checkpoints=0")
    blobs = DirBlobStore(tmp_path / "blobs")
    for step in range(1, 6):
        await commit(ctx, blobs, step)
    assert await collect(ctx, blobs) == []
    assert len(await stored(blobs)) == 10

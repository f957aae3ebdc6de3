"""Large batches by reference (``miles.weights.batches``): a batch's samples through the blob
store and back, verified, written once however often the buffer publishes the batch, and
collected once a committed step trained it."""

from __future__ import annotations

import random
from pathlib import Path

import msgspec
import pytest
from contract.record_harness import manifest

from miles.events import Batch, TrainSample
from miles.runtime.bus import MemoryBroker, MemoryBus
from miles.runtime.memory_store import MemoryManifests, MemoryRun
from miles.weights import batches
from miles.weights.blobs import BlobStore, ChecksumMismatch, DirBlobStore, ObjectBlobStore
from services.trainer.collection import collect_batches

RUN = "r"


def batch(batch_id: str, samples: int = 64, tokens: int = 200) -> Batch:
    rng = random.Random(batch_id)
    return Batch(
        run_id=RUN,
        policy_version=3,
        batch_id=batch_id,
        task_ids=[f"t{i}" for i in range(samples // 8)],
        samples=[
            TrainSample(
                sample_id=f"{batch_id}/{i}",
                prompt_ids=[rng.randrange(100) for _ in range(tokens)],
                response_ids=[rng.randrange(100) for _ in range(tokens)],
                response_logprobs=[rng.uniform(-3, 0) for _ in range(tokens)],
                advantage=rng.uniform(-1, 1),
                reward=1.0,
                policy_version=3,
            )
            for i in range(samples)
        ],
    )


@pytest.fixture(params=["dir", "objects"])
def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "dir":
        return DirBlobStore(tmp_path / "blobs")
    bus = MemoryBus(MemoryBroker(), RUN, "buffer")
    return ObjectBlobStore(bus, f"miles_{RUN}_blobs", tmp_path / "cache")


async def test_a_batch_goes_by_reference_and_comes_back_whole(blobs: BlobStore) -> None:
    full = batch("b1")
    small = await batches.by_reference(full, blobs)
    assert small.samples == [] and small.samples_uri and small.samples_sha256
    assert batches.inline_size(small) < 1000 < batches.inline_size(full) // 100
    back = await batches.resolved(
        msgspec.msgpack.decode(msgspec.msgpack.encode(small), type=Batch), blobs
    )
    assert back.samples == full.samples
    assert (back.batch_id, back.task_ids, back.policy_version) == ("b1", full.task_ids, 3)
    assert await batches.resolved(full, blobs) is full  # inline: nothing to read


async def test_publishing_again_finds_the_blob_written(tmp_path: Path) -> None:
    blobs = DirBlobStore(tmp_path / "blobs")
    first = await batches.by_reference(batch("b1"), blobs)
    written = tmp_path / "blobs" / "batches" / "b1" / batches.SAMPLES_FILE
    before = written.stat().st_ino
    again = await batches.by_reference(batch("b1"), blobs)
    assert again == first
    assert written.stat().st_ino == before  # not rewritten under a trainer reading it


async def test_tampered_samples_are_refused(tmp_path: Path) -> None:
    blobs = DirBlobStore(tmp_path / "blobs")
    small = await batches.by_reference(batch("b1"), blobs)
    written = tmp_path / "blobs" / "batches" / "b1" / batches.SAMPLES_FILE
    written.write_bytes(written.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ChecksumMismatch):
        await batches.resolved(small, blobs)


async def test_trained_batches_blobs_are_collected(blobs: BlobStore) -> None:
    manifests = MemoryManifests(MemoryRun(RUN))
    for batch_id in ("b1", "b2"):
        await batches.by_reference(batch(batch_id, samples=8), blobs)
    await manifests.commit(manifest(RUN, 1, "b1", "file:///w1"))
    assert await collect_batches(manifests, blobs) == ["batches/b1"]
    assert await blobs.names(batches.FAMILY) == ["batches/b2"]  # not trained yet: kept

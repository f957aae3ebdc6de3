"""Large batches by reference: a batch whose event would exceed ``buffer.inline_batch_bytes``
rides the blob store, as weights do. The ``batch`` event then carries the samples' URI and
sha256 and no samples; the trainer reads and verifies them before it trains.

The blob is named after the batch id (``batches/<batch_id>``), so a buffer that publishes the
same batch again after a crash writes the same name with the same bytes (or finds it written and
leaves it), and JetStream's dedup keeps one event. The trainer deletes the blob once the step
that trained the batch is committed and the batch acked; ``stale`` finds those a crash left.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import msgspec
from msgspec.structs import replace

from miles.events import Batch, TrainSample
from miles.weights.blobs import BlobMissing, BlobStore, ChecksumMismatch

FAMILY = "batches"
SAMPLES_FILE = "samples.msgpack"


def blob_name(batch_id: str) -> str:
    return f"{FAMILY}/{batch_id}"


def batch_id_of(name: str) -> str:
    """``batches/<batch_id>`` -> ``<batch_id>``."""
    return name.removeprefix(f"{FAMILY}/")


def inline_size(batch: Batch) -> int:
    """The bytes the event would take with its samples inline."""
    return len(msgspec.msgpack.encode(batch))


async def by_reference(batch: Batch, blobs: BlobStore) -> Batch:
    """``batch`` with its samples moved into the blob store."""
    data = msgspec.msgpack.encode(batch.samples)
    sha256 = hashlib.sha256(data).hexdigest()
    name = blob_name(batch.batch_id)
    uri = await _written(blobs, name, sha256)
    if uri is None:
        staging = Path(tempfile.mkdtemp(prefix="miles-batch-"))
        try:
            (staging / SAMPLES_FILE).write_bytes(data)
            uri = await blobs.put_dir(staging, name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return replace(batch, samples=[], samples_uri=uri, samples_sha256=sha256)


async def _written(blobs: BlobStore, name: str, sha256: str) -> str | None:
    """The URI of ``name`` when a publish before a crash wrote it whole already: rewriting it
    could pull it from under a trainer reading it."""
    uri = blobs.uri(name)
    try:
        await blobs.get_dir(uri, sha256, checked=SAMPLES_FILE)
    except (BlobMissing, ChecksumMismatch):
        return None
    return uri


async def resolved(batch: Batch, blobs: BlobStore) -> Batch:
    """``batch`` with its samples, read from the blob store and verified when it carries a
    reference; ``BlobMissing`` or ``ChecksumMismatch`` when they cannot be had."""
    if not batch.samples_uri:
        return batch
    path = await blobs.get_dir(batch.samples_uri, batch.samples_sha256, checked=SAMPLES_FILE)
    data = (path / SAMPLES_FILE).read_bytes()
    return replace(batch, samples=msgspec.msgpack.decode(data, type=list[TrainSample]))

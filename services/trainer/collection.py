"""Collecting old steps' files from the blob store, after a commit and at start (``retention``
decides what goes).

    list what the store holds -> the steps outside what is kept and not leased
    mark them collected in Redis (atomic against an export's lease: one or the other wins)
    -> delete every file of a committed step that no kept manifest names

The manifest is durable before anything is deleted (collection runs after the commit), and only
files no kept manifest names are deleted, so the latest manifest never points at a deleted file.
Each collection starts again from what the store holds: one cut short (``trainer.mid_gc``)
leaves files that the next one, at the trainer's restart or after its next commit, deletes.
"""

from __future__ import annotations

import logging

from miles.runtime import faults
from miles.runtime.run_record import ManifestsPort
from miles.runtime.service import ServiceContext
from miles.weights import batches
from miles.weights.blobs import BlobStore
from services.trainer.retention import (
    FAMILIES,
    Retention,
    StoredBlob,
    collectable_steps,
    garbage,
    leaf_of,
)

log = logging.getLogger("miles.trainer")


async def collect(ctx: ServiceContext, blobs: BlobStore) -> list[StoredBlob]:
    """Delete what no reader can need any more; returns what was deleted."""
    retention = Retention.of(ctx.config)
    latest = await ctx.manifests.latest_step()
    if not retention.collects or not latest:
        return []
    stored = [
        blob
        for family in FAMILIES
        for name in await blobs.names(family)
        if (blob := StoredBlob.parse(name)) is not None
    ]
    weight_steps = {blob.step for blob in stored if blob.family == "weights"}
    leased = await ctx.manifests.leased()
    condemned = await ctx.manifests.condemn(
        collectable_steps(weight_steps, latest, retention, leased)
    )
    kept = {step for step in weight_steps - set(condemned) if step <= latest}
    referenced = await named_files(ctx.manifests, kept, retention.checkpoints_kept(latest))
    doomed = garbage(stored, latest, referenced)
    for blob in doomed:
        await blobs.delete(blob.name)
        faults.crash_point("trainer.mid_gc")
    if doomed:
        log.info(
            "collected %d file(s) of step(s) %s; kept the weights of %s",
            len(doomed),
            sorted({blob.step for blob in doomed}),
            sorted(kept),
        )
    return doomed


async def named_files(
    manifests: ManifestsPort, weight_steps: set[int], state_steps: range
) -> set[str]:
    """The leaves of the weights of ``weight_steps`` and of the full states that the manifests
    of ``state_steps`` name."""
    named = set()
    for step in sorted(weight_steps | set(state_steps)):
        manifest = await manifests.get(step)
        if manifest is None:
            continue
        if step in weight_steps:
            named.add(leaf_of(manifest.weights_uri))
        if step in state_steps and manifest.state_uri:
            named.add(leaf_of(manifest.state_uri))
    return named


async def collect_batches(manifests: ManifestsPort, blobs: BlobStore) -> list[str]:
    """Delete the blobs of large batches a committed step trained (the trainer deletes each
    after its ack; a crash in between leaves it); returns their names."""
    gone = []
    for name in await blobs.names(batches.FAMILY):
        if await manifests.trained(batches.batch_id_of(name)):
            await blobs.delete(name)
            gone.append(name)
    if gone:
        log.info("collected %d trained batch blob(s)", len(gone))
    return gone

"""One batch through the trainer: train, write, commit, push, announce, ack, in that order.

The order is the trainer's fault tolerance. Nothing is announced before it is committed, and the
batch is acked last, so a crash anywhere makes JetStream redeliver it: before the commit
(``trainer.stepped``) it is trained again from the last committed step; after it
(``trainer.committed``) the ledger knows it, and ``reannounce`` publishes its step again.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from miles import events, telemetry
from miles.runtime import faults
from miles.runtime.bus import Message
from miles.runtime.checkpoint import Manifest
from miles.runtime.service import ServiceContext
from miles.telemetry import record
from miles.trainer import StepMetrics
from miles.weights import batches
from miles.weights.blobs import BlobStore
from services.trainer.checkpointing import (
    announce,
    commit,
    dataset_cursor,
    push_weights,
    write_state,
    write_weights,
)
from services.trainer.outcome import StepResult, build_manifest
from services.trainer.position import ResumeState

log = logging.getLogger("miles.trainer")


async def handle(
    ctx: ServiceContext,
    actor: Any,
    blobs: BlobStore,
    batch: events.Batch,
    msg: Message,
    position: ResumeState,
    wait_start: float,
) -> Manifest | None:
    """One pulled batch: the committed step that trained it, or None when the ledger says an
    earlier step did (then its step is re-announced and the batch acked, not trained again)."""
    with ctx.bus.process(msg):
        if await ctx.manifests.trained(batch.batch_id):
            await reannounce(ctx, blobs, batch, msg)
            return None
        seconds = {"wait_for_batch": time.monotonic() - wait_start}
        batch = await batches.resolved(batch, blobs)  # a large batch's samples
        return await train(ctx, actor, blobs, batch, msg, position, seconds)


async def train(
    ctx: ServiceContext,
    actor: Any,
    blobs: BlobStore,
    batch: events.Batch,
    msg: Message,
    position: ResumeState,
    seconds: dict[str, float],
) -> Manifest:
    """Train ``batch`` from ``position``, write and commit the next step, push, announce, ack."""
    config, bus = ctx.config, ctx.bus
    plan = position.plan(config.trainer.checkpoint_every, attempt=uuid.uuid4().hex[:8])
    links = telemetry.links_from(traceparents=batch.traceparents)  # every group's trace
    with ctx.busy(), telemetry.linked_span("train step", links, {"miles.step": plan.step}):
        started = time.monotonic()
        work = actor.train_step.remote(batch.samples, position.step)
        metrics: StepMetrics = await bus.hold(work, [msg])
        seconds["train"] = time.monotonic() - started
        record.trained(ctx.metrics, batch.samples, metrics.to_dict(), version=position.step)
        faults.crash_point("trainer.stepped")
        weights = await write_weights(ctx, actor, blobs, plan, msg, seconds)
        full_state = position.full_state
        if plan.state_due:
            full_state = await write_state(ctx, actor, blobs, plan, msg, seconds)
        rng_state = await actor.rng_state.remote(plan.step)
        result = StepResult(plan, metrics, weights, full_state, rng_state, seconds)
        manifest = build_manifest(
            result,
            batch,
            run_id=ctx.run_id,
            dataset_cursor=await dataset_cursor(ctx),
            config_hash=config.hash(),
        )
        await commit(ctx, manifest)
        faults.crash_point("trainer.committed")
        if config.rollout.pushes_weights:
            await push_weights(ctx, actor, plan.step, msg)
        await announce(ctx, manifest)
        await msg.ack()
        if batch.samples_uri:  # trained and committed: no one reads it again
            await blobs.delete(batches.blob_name(batch.batch_id))
        ctx.clock.processed += 1
        ctx.metrics.commit_step(plan.step, plan.step, time.monotonic() - started)
    return manifest


async def reannounce(
    ctx: ServiceContext, blobs: BlobStore, batch: events.Batch, msg: Message
) -> None:
    """A redelivered batch the ledger says was trained: announce its step again and ack (and
    delete its samples' blob, which a crash before the delete left)."""
    done = await ctx.manifests.step_of(batch.batch_id)
    log.info("batch %s was trained in step %s; re-announcing", batch.batch_id, done and done.step)
    if done is not None:
        await announce(ctx, done)
    await msg.ack()
    if batch.samples_uri:
        await blobs.delete(batches.blob_name(batch.batch_id))

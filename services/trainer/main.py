"""Trainer: batches in, committed steps and new weights out.

lay the trainer out (trainer.layout = "auto": the planner picks the sizes for its devices)
resume from the latest manifest: its weights, its optimizer state and RNG
finish a collection of old files that a crash cut short
loop:
    pull one batch
    if the ledger says it was trained: re-announce its step (idempotent) and ack
    train one step on the Ray actor
    write the weights (every step) and the full state (every K steps) under unique names
    commit the manifest in Redis (written once; `latest` moves by compare-and-set)
    publish weights and step events (deduped by version), then ack the batch
    collect old steps' files from the blob store (trainer.keep_checkpoints)
    if the Ray actor died (and was restarted with the base model): nak the batch, resume the
    actor from the latest manifest, go on

The decisions are pure code: ``position`` (the committed step and full state carried over,
when a full state is due, the names a step writes) and ``outcome`` (the manifest built from a
step's results, the events announced from a manifest). ``step`` takes one batch through the
sequence, ``checkpointing`` makes its writes, ``recovery`` keeps the actor (its resources, a
resume, a restart waited out); ``retention`` decides which old files go, ``collection`` deletes
them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray

from miles import events
from miles.runtime import raycluster
from miles.runtime.service import ServiceContext
from miles.runtime.subjects import TRAINER_CONSUMER
from miles.telemetry import record
from miles.weights.follow import make_blob_store
from services.trainer.actor import TrainerActor
from services.trainer.collection import collect, collect_batches
from services.trainer.layout import with_layout
from services.trainer.position import ResumeState
from services.trainer.recovery import LOST_WEIGHTS, recover, resume, trainer_resources
from services.trainer.step import handle

log = logging.getLogger("miles.trainer")


async def main(ctx: ServiceContext) -> None:
    config, bus = ctx.config, ctx.bus
    raycluster.connect(config.infra.ray_address, namespace=ctx.run_id)
    laid_out = with_layout(config)  # trainer.layout = "auto": the planner's sizes
    actor: Any = (
        ray.remote(TrainerActor)
        .options(**trainer_resources(laid_out.trainer))
        .remote(str(ctx.recipe.path), laid_out.model_dump_json())
    )
    blobs = make_blob_store(config, bus, ctx.run_dir)
    position = await resume(actor, blobs, await ctx.manifests.latest())
    await collect(ctx, blobs)  # what a collection cut short by a crash left
    await collect_batches(ctx.manifests, blobs)  # trained large batches a crash left
    batches = await bus.pull("batches", TRAINER_CONSUMER)
    log.info("trainer %s ready at step %d", ctx.instance, position.step)

    bleed = record.BleedWindow(ctx.metrics, "trainer_waiting_for_data")
    while not ctx.stopping.is_set():
        wait_start = time.monotonic()
        with ctx.waiting("buffer_wait", bleed):  # trainer waiting for data: half of the bleed
            got = await bus.fetch(batches, events.Batch, 1, 1.0)
        if not got:
            continue
        batch, msg = got[0]
        try:
            manifest = await handle(ctx, actor, blobs, batch, msg, position, wait_start)
        except LOST_WEIGHTS as lost:
            position = await recover(ctx, actor, blobs, msg, lost)
            continue
        if manifest is None:  # trained before: re-announced
            continue
        position = ResumeState.of(manifest)
        bleed.close()
        log.info(
            "step %d: loss %.4f reward %.3f",
            manifest.step,
            manifest.metrics["loss"],
            manifest.reward_mean,
        )
        await collect(ctx, blobs)

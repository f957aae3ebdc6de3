"""Buffer: scored groups in, training batches out.

loop:
    pull scored groups; a redelivered group replaces its stale handle (deduplicated by task id)
    a group the buffer batched before a crash: ack it if its batch was published, else hold it
        until its whole batch is back and publish that batch again, unchanged
    drop what cannot be trained (failed, stale, zero variance): record why, tell the coordinator;
        a group from a broken producer (non-finite reward, future version) is dead-lettered too
    hold the rest unacked (JetStream redelivers them to a restarted buffer)
    every B held groups, oldest first: record the batch's groups in Redis, publish the batch
        (its samples through the blob store when it is larger than buffer.inline_batch_bytes),
        mark it published, then ack its groups

The decisions are ``core.BufferCore``'s; this loop carries out its actions in order.
"""

from __future__ import annotations

import logging
import time

from miles import events, telemetry
from miles.algo.batching import FILTER_REASONS, make_batch
from miles.runtime import faults
from miles.runtime.bus import Message, Oversized
from miles.runtime.service import ServiceContext
from miles.runtime.subjects import BUFFER_CONSUMER
from miles.telemetry import record
from miles.weights import batches
from miles.weights.blobs import BlobStore
from miles.weights.follow import make_blob_store
from services.buffer.core import Ack, Action, BufferCore, Drop, Held, Publish

log = logging.getLogger("miles.buffer")


async def main(ctx: ServiceContext) -> None:
    bus, store, size = ctx.bus, ctx.store, ctx.config.buffer.groups_per_batch
    blobs = make_blob_store(ctx.config, bus, ctx.run_dir)  # for batches too large for an event
    scored = await bus.pull("scored", BUFFER_CONSUMER)
    core: BufferCore[Message] = BufferCore(ctx.config.buffer, bus.ack_wait / 3, time.monotonic())
    record.expect(ctx.metrics.groups_filtered, "reason", (*FILTER_REASONS, "oversized"))
    log.info("buffer %s ready: %d groups per batch", ctx.instance, size)

    while not ctx.stopping.is_set():
        with ctx.waiting():
            arrived = await bus.fetch(scored, events.ScoredGroup, 64, 1.0)
        with ctx.busy():
            plans = await store.batch_plans([group.task_id for group, _ in arrived])
            version = await store.policy_version()
            ctx.metrics.policy_version.set(version)
            ctx.metrics.groups_received.inc(len(arrived))
            decided = core.step([Held(group, msg) for group, msg in arrived], plans, version)
            for action in decided.actions:
                await carry_out(ctx, blobs, action)
            if decided.holding:
                faults.crash_point("buffer.holding")
            ctx.metrics.buffer_depth.set(core.depth)
            for msg in core.renewals(time.monotonic()):  # held groups stay ours
                await msg.in_progress()


async def carry_out(ctx: ServiceContext, blobs: BlobStore, action: Action[Message]) -> None:
    """A batch has a trace of its own; anything else about one group happens in the span of
    the message that brought it, the end of the group's journey (held, acked or dropped)."""
    if isinstance(action, Publish):
        await publish(ctx, blobs, action)
        return
    with ctx.bus.process(action.held.handle):
        if isinstance(action, Ack):
            await action.held.handle.ack()
        if isinstance(action, Drop):
            await drop(ctx, action)


async def publish(ctx: ServiceContext, blobs: BlobStore, action: Publish[Message]) -> None:
    if action.replay:
        log.info("publishing batch %s again after a restart", action.replay)
    try:
        await publish_batch(ctx, blobs, action.groups)
    except Oversized:  # dead-lettered: its groups cannot be trained this way
        for dropped in action.oversized():
            await drop(ctx, dropped)


async def publish_batch(ctx: ServiceContext, blobs: BlobStore, held: list[Held[Message]]) -> None:
    """Plan, publish, mark published, ack: a crash anywhere in between replays the same batch.

    The batch starts a trace of its own, linked to its groups' traces, and carries their
    context so the trainer's step can link to them too.
    """
    batch = make_batch(
        ctx.run_id,
        [h.group for h in held],
        ctx.config.algorithm,
        ctx.config.rollout.max_new_tokens,
    )
    traceparents = {h.task_id: (h.handle.headers or {}).get("traceparent", "") for h in held}
    batch.traceparents = [traceparents[task_id] for task_id in batch.task_ids]
    links = telemetry.links_from(traceparents=batch.traceparents)
    with telemetry.root_span("batch", {"miles.batch_id": batch.batch_id}, links):
        await ctx.store.plan_batch(batch.batch_id, batch.task_ids)
        if batches.inline_size(batch) > ctx.config.buffer.inline_batch_bytes:
            batch = await batches.by_reference(batch, blobs)
        await ctx.bus.publish(ctx.subjects.batches, batch, msg_id=batch.batch_id)
        await ctx.store.mark_published(batch.batch_id, batch.task_ids)
    faults.crash_point("buffer.published")
    for h in held:
        await h.handle.ack()
    ctx.clock.processed += 1
    ctx.metrics.batches_published.inc()
    where = " (by reference)" if batch.samples_uri else ""
    log.info("batch %s: %d groups%s", batch.batch_id, len(held), where)


async def drop(ctx: ServiceContext, action: Drop[Message]) -> None:
    """Dead-letter (bad input), record once per group, tell the coordinator, then ack."""
    group, msg = action.held.group, action.held.handle
    if action.dead_letter:
        await ctx.bus.dead_letter(msg.subject, msg.data, action.reason, f"group {group.task_id}")
    if await ctx.store.record_filtered(group.task_id, action.reason):  # counted once per group
        ctx.metrics.groups_filtered.labels(reason=action.reason).inc()
    notice = events.GroupFiltered(
        run_id=ctx.run_id,
        policy_version=group.policy_version,
        task_id=group.task_id,
        reason=action.reason,
    )
    await ctx.bus.publish(ctx.subjects.filtered, notice, msg_id=f"filtered/{group.task_id}")
    await msg.ack()

"""Buffer: scored groups in, training batches out.

loop:
    pull scored groups; a redelivered group replaces its stale handle (deduplicated by task id)
    a group the buffer batched before a crash: ack it if its batch was published, else hold it
        until its whole batch is back and publish that batch again, unchanged
    drop what cannot be trained (failed, stale, zero variance): record why, tell the coordinator;
        a group from a broken producer (non-finite reward, future version) is dead-lettered too
    hold the rest unacked (JetStream redelivers them to a restarted buffer)
    every B held groups, oldest first: record the batch's groups in Redis, publish the batch,
        mark it published, then ack its groups
"""

from __future__ import annotations

import logging
import time

from miles import events, telemetry
from miles.algo.batching import BAD_INPUT, FILTER_REASONS, dispatch_order, filter_reason, make_batch
from miles.runtime import faults
from miles.runtime.bus import Message, Oversized
from miles.runtime.service import ServiceContext
from miles.runtime.subjects import BUFFER_CONSUMER
from miles.telemetry import record

log = logging.getLogger("miles.buffer")


async def main(ctx: ServiceContext) -> None:
    bus, config, store = ctx.bus, ctx.config, ctx.store
    size = config.buffer.groups_per_batch
    scored = await bus.pull("scored", BUFFER_CONSUMER)
    pending: dict[str, tuple[events.ScoredGroup, Message]] = {}
    replays: dict[str, list[str]] = {}  # batch id -> its task ids: planned, maybe not published
    last_touch = time.monotonic()
    held_version = -1
    record.expect(ctx.metrics.groups_filtered, "reason", (*FILTER_REASONS, "oversized"))
    log.info("buffer %s ready: %d groups per batch", ctx.instance, size)

    while not ctx.stopping.is_set():
        with ctx.waiting():
            arrived = await bus.fetch(scored, events.ScoredGroup, 64, 1.0)
        with ctx.busy():
            plans = await store.batch_plans([group.task_id for group, _ in arrived])
            version = await store.policy_version()
            ctx.metrics.policy_version.set(version)
            for group, msg in arrived:
                with bus.process(msg):  # the end of the group's journey: accepted or dropped
                    ctx.metrics.groups_received.inc()
                    plan = plans.get(group.task_id)
                    if plan is not None and plan.published:  # its batch is in the stream
                        pending.pop(group.task_id, None)
                        await msg.ack()
                    elif plan is not None:  # planned before a crash: wait for its whole batch
                        pending[group.task_id] = (group, msg)
                        replays[plan.batch_id] = plan.task_ids
                    else:
                        pending[group.task_id] = (group, msg)
                        await admit(ctx, group, msg, version, pending)
            for batch_id, task_ids in list(replays.items()):
                if all(task_id in pending for task_id in task_ids):
                    log.info("publishing batch %s again after a restart", batch_id)
                    await publish_batch(ctx, [pending.pop(t) for t in task_ids])
                    del replays[batch_id]
            replaying = {task_id for task_ids in replays.values() for task_id in task_ids}
            if version != held_version:  # a new policy: groups held since may have gone stale
                fresh = {group.task_id for group, _ in arrived}
                for task_id, (group, msg) in list(pending.items()):
                    if task_id not in replaying and task_id not in fresh:
                        with bus.process(msg):
                            await admit(ctx, group, msg, version, pending)
                held_version = version

            ready = sorted((t for t in pending if t not in replaying), key=dispatch_order)
            if 0 < len(ready) < size:
                faults.crash_point("buffer.holding")
            while len(ready) >= size:
                chosen, ready = ready[:size], ready[size:]
                held = [pending.pop(task_id) for task_id in chosen]
                try:
                    await publish_batch(ctx, held)
                except Oversized:  # dead-lettered: its groups cannot be trained this way
                    for group, msg in held:
                        await drop(ctx, group, "oversized")
                        await msg.ack()
            ctx.metrics.buffer_depth.set(len(pending))

            if time.monotonic() - last_touch > bus.ack_wait / 3:  # held groups stay ours
                for _, msg in pending.values():
                    await msg.in_progress()
                last_touch = time.monotonic()


async def admit(
    ctx: ServiceContext,
    group: events.ScoredGroup,
    msg: Message,
    version: int,
    pending: dict[str, tuple[events.ScoredGroup, Message]],
) -> None:
    """Keep a held group, or drop it (recorded, acked) if it cannot be trained on."""
    reason = filter_reason(group, version, ctx.config.buffer)
    if reason is None:
        return
    del pending[group.task_id]
    if reason in BAD_INPUT:
        await ctx.bus.dead_letter(msg.subject, msg.data, reason, f"group {group.task_id}")
    await drop(ctx, group, reason)
    await msg.ack()


async def publish_batch(
    ctx: ServiceContext, held: list[tuple[events.ScoredGroup, Message]]
) -> None:
    """Plan, publish, mark published, ack: a crash anywhere in between replays the same batch.

    The batch starts a trace of its own, linked to its groups' traces, and carries their
    context so the trainer's step can link to them too.
    """
    batch = make_batch(ctx.run_id, [group for group, _ in held], ctx.config.grpo)
    traceparents = {
        group.task_id: (msg.headers or {}).get("traceparent", "") for group, msg in held
    }
    batch.traceparents = [traceparents[task_id] for task_id in batch.task_ids]
    links = telemetry.links_from(traceparents=batch.traceparents)
    with telemetry.root_span("batch", {"miles.batch_id": batch.batch_id}, links):
        await ctx.store.plan_batch(batch.batch_id, batch.task_ids)
        await ctx.bus.publish(ctx.subjects.batches, batch, msg_id=batch.batch_id)
        await ctx.store.mark_published(batch.batch_id, batch.task_ids)
    faults.crash_point("buffer.published")
    for _, msg in held:
        await msg.ack()
    ctx.clock.processed += 1
    ctx.metrics.batches_published.inc()
    log.info("batch %s: %d groups, %d samples", batch.batch_id, len(held), len(batch.samples))


async def drop(ctx: ServiceContext, group: events.ScoredGroup, reason: str) -> None:
    if await ctx.store.record_filtered(group.task_id, reason):  # counted once per group
        ctx.metrics.groups_filtered.labels(reason=reason).inc()
    notice = events.GroupFiltered(
        run_id=ctx.run_id, policy_version=group.policy_version, task_id=group.task_id, reason=reason
    )
    await ctx.bus.publish(ctx.subjects.filtered, notice, msg_id=f"filtered/{group.task_id}")

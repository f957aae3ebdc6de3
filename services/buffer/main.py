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

from nats.aio.msg import Msg

from miles import events, faults
from miles.batching import BAD_INPUT, dispatch_order, filter_reason, make_batch
from miles.bus import Oversized
from miles.service import ServiceContext
from miles.subjects import BUFFER_CONSUMER

log = logging.getLogger("miles.buffer")


async def main(ctx: ServiceContext) -> None:
    bus, config, store = ctx.bus, ctx.config, ctx.store
    size = config.buffer.groups_per_batch
    scored = await bus.pull("scored", BUFFER_CONSUMER)
    pending: dict[str, tuple[events.ScoredGroup, Msg]] = {}
    replays: dict[str, list[str]] = {}  # batch id -> its task ids: planned, maybe not published
    last_touch = time.monotonic()
    log.info("buffer %s ready: %d groups per batch", ctx.instance, size)

    while not ctx.stopping.is_set():
        with ctx.clock.waiting():
            arrived = await bus.fetch(scored, events.ScoredGroup, 64, 1.0)
        with ctx.clock.busy():
            for group, msg in arrived:
                pending[group.task_id] = (group, msg)
            plans = await store.batch_plans([group.task_id for group, _ in arrived])
            for task_id, (batch_id, task_ids, published) in plans.items():
                if published:  # its batch is durable in the batches stream already
                    await pending.pop(task_id)[1].ack()
                else:
                    replays[batch_id] = task_ids
            for batch_id, task_ids in list(replays.items()):
                if all(task_id in pending for task_id in task_ids):
                    log.info("publishing batch %s again after a restart", batch_id)
                    await publish_batch(ctx, [pending.pop(t) for t in task_ids])
                    del replays[batch_id]
            replaying = {task_id for task_ids in replays.values() for task_id in task_ids}

            version = await store.policy_version()
            for task_id, (group, msg) in list(pending.items()):
                reason = filter_reason(group, version, config.buffer)
                if reason is not None and task_id not in replaying:
                    del pending[task_id]
                    if reason in BAD_INPUT:
                        await bus.dead_letter(msg.subject, msg.data, reason, f"group {task_id}")
                    await drop(ctx, group, reason)
                    await msg.ack()
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

            if time.monotonic() - last_touch > bus.ack_wait / 3:  # held groups stay ours
                for _, msg in pending.values():
                    await msg.in_progress()
                last_touch = time.monotonic()


async def publish_batch(ctx: ServiceContext, held: list[tuple[events.ScoredGroup, Msg]]) -> None:
    """Plan, publish, mark published, ack: a crash anywhere in between replays the same batch."""
    batch = make_batch(ctx.run_id, [group for group, _ in held], ctx.config.grpo)
    await ctx.store.plan_batch(batch.batch_id, batch.task_ids)
    await ctx.bus.publish(ctx.subjects.batches, batch, msg_id=batch.batch_id)
    await ctx.store.mark_published(batch.batch_id, batch.task_ids)
    faults.crash_point("buffer.published")
    for _, msg in held:
        await msg.ack()
    ctx.clock.processed += 1
    log.info("batch %s: %d groups, %d samples", batch.batch_id, len(held), len(batch.samples))


async def drop(ctx: ServiceContext, group: events.ScoredGroup, reason: str) -> None:
    await ctx.store.record_filtered(group.task_id, reason)
    notice = events.GroupFiltered(
        run_id=ctx.run_id, policy_version=group.policy_version, task_id=group.task_id, reason=reason
    )
    await ctx.bus.publish(ctx.subjects.filtered, notice, msg_id=f"filtered/{group.task_id}")

"""Buffer: scored groups in, training batches out.

loop:
    pull scored groups
    drop what cannot be trained (failed, stale, zero variance): tell the coordinator, ack
    hold the rest unacked (JetStream keeps them for us if we die)
    every B held groups: compute group advantages, publish the batch, then ack its groups
"""

from __future__ import annotations

import logging
import time

from nats.aio.msg import Msg

from miles import events
from miles.batching import filter_reason, make_batch
from miles.service import ServiceContext
from miles.subjects import BUFFER_CONSUMER

log = logging.getLogger("miles.buffer")


async def main(ctx: ServiceContext) -> None:
    bus, config = ctx.bus, ctx.config
    size = config.buffer.groups_per_batch
    scored = await bus.pull("scored", BUFFER_CONSUMER)
    pending: dict[str, tuple[events.ScoredGroup, Msg]] = {}  # insertion order = arrival order
    last_touch = time.monotonic()
    log.info("buffer %s ready: %d groups per batch", ctx.instance, size)

    while not ctx.stopping.is_set():
        with ctx.clock.waiting():
            arrived = await bus.fetch(scored, events.ScoredGroup, 64, 1.0)
        with ctx.clock.busy():
            version = await ctx.store.policy_version()
            for group, msg in arrived:
                pending[group.task_id] = (group, msg)  # a redelivery replaces the stale handle
            for task_id, (group, msg) in list(pending.items()):
                reason = filter_reason(group, version, config.buffer)
                if reason is not None:
                    del pending[task_id]
                    await drop(ctx, group, reason)
                    await msg.ack()
            while len(pending) >= size:
                chosen = list(pending)[:size]
                groups = [pending[task_id][0] for task_id in chosen]
                batch = make_batch(ctx.run_id, groups, config.grpo)
                await bus.publish(ctx.subjects.batches, batch, msg_id=batch.batch_id)
                for task_id in chosen:
                    await pending.pop(task_id)[1].ack()
                ctx.clock.processed += 1
                log.info(
                    "batch %s: %d groups, %d samples", batch.batch_id, size, len(batch.samples)
                )
            if time.monotonic() - last_touch > 10:  # held groups must not be redelivered
                for _, msg in pending.values():
                    await msg.in_progress()
                last_touch = time.monotonic()


async def drop(ctx: ServiceContext, group: events.ScoredGroup, reason: str) -> None:
    await ctx.store.count_filtered(reason)
    notice = events.GroupFiltered(
        run_id=ctx.run_id, policy_version=group.policy_version, task_id=group.task_id, reason=reason
    )
    await ctx.bus.publish(ctx.subjects.filtered, notice, msg_id=f"filtered/{group.task_id}")

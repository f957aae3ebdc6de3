"""Reward: generated groups in, scored groups out.

loop:
    pull generated groups (shared durable consumer: start more replicas to scale)
    score every sample with the recipe's @miles.reward functions (failures recorded, not raised)
    publish the scored group (train -> buffer, eval -> coordinator), then ack the input

What a scored group is and where it goes are ``core``'s decisions; this is the loop.
"""

from __future__ import annotations

import logging
import time

from miles import events, telemetry
from miles.runtime import faults
from miles.runtime.bus import Oversized
from miles.runtime.service import ServiceContext
from miles.runtime.subjects import REWARD_CONSUMER
from miles.scoring import score
from miles.telemetry import record
from services.reward.core import Delivery, delivery, scored_group

log = logging.getLogger("miles.reward")


async def main(ctx: ServiceContext) -> None:
    bus = ctx.bus
    generated = await bus.pull("generated", REWARD_CONSUMER)
    record.expect(ctx.metrics.reward, "reward_fn", ctx.recipe.rewards)
    record.expect(ctx.metrics.reward_running_sum, "reward_fn", ctx.recipe.rewards)
    log.info("reward %s ready with %s", ctx.instance, ", ".join(ctx.recipe.rewards))
    while not ctx.stopping.is_set():
        with ctx.waiting():
            batch = await bus.fetch(generated, events.GeneratedGroup, 16, 1.0)
        for group, msg in batch:
            with ctx.busy("reward"), bus.process(msg):
                await deliver(ctx, await score_group(ctx, group))
                faults.crash_point("reward.mid_batch")
                await msg.ack()
                ctx.clock.processed += 1


async def score_group(ctx: ServiceContext, group: events.GeneratedGroup) -> Delivery:
    with telemetry.span("score"):
        start = time.monotonic()
        rewards = [await score(sample, ctx.recipe.rewards) for sample in group.samples]
        for sample in group.samples:
            if sample.failed:
                log.warning("sample %s failed: %s", sample.sample_id, sample.error)
        scored = scored_group(ctx.run_id, group, time.monotonic() - start)
        record.scored(ctx.metrics, scored, rewards)
    return delivery(ctx.subjects, scored)


async def deliver(ctx: ServiceContext, out: Delivery) -> None:
    try:
        await ctx.bus.publish(out.subject, out.scored, msg_id=out.msg_id)
    except Oversized:  # dead-lettered by the bus
        if out.replace_if_oversized:
            await ctx.store.record_filtered(out.scored.task_id, "oversized")

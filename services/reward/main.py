"""Reward: generated groups in, scored groups out.

loop:
    pull generated groups (shared durable consumer: start more replicas to scale)
    score the fetched groups together: every @miles.reward function and reward model on each
        group, calls bounded and timed out (failures recorded on the samples, not raised)
    publish each scored group (train -> buffer, eval -> coordinator), then ack its input

What a scored group is and where it goes are ``core``'s decisions; this is the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time

from miles import events, telemetry
from miles.runtime import faults, raycluster
from miles.runtime.bus import Message, Oversized
from miles.runtime.service import ServiceContext
from miles.runtime.subjects import REWARD_CONSUMER
from miles.scoring import Limits, Scorer, from_recipe, score_samples
from miles.scoring.models import close_models, reward_models
from miles.telemetry import record
from services.reward.core import Delivery, delivery, scored_group

log = logging.getLogger("miles.reward")


async def main(ctx: ServiceContext) -> None:
    bus = ctx.bus
    config = ctx.config.reward
    if any(model.kind == "hf" for model in config.models):  # held by a Ray actor
        raycluster.connect(ctx.config.infra.ray_address, namespace=ctx.run_id)
    scorers: list[Scorer] = [*from_recipe(ctx.recipe.rewards), *reward_models(ctx.config)]
    limits = Limits(config.concurrency, config.timeout_seconds)
    names = [scorer.name for scorer in scorers]
    generated = await bus.pull("generated", REWARD_CONSUMER)
    record.expect(ctx.metrics.reward, "reward_fn", names)
    record.expect(ctx.metrics.reward_running_sum, "reward_fn", names)
    log.info("reward %s ready with %s", ctx.instance, ", ".join(names))
    try:
        while not ctx.stopping.is_set():
            with ctx.waiting():
                batch = await bus.fetch(generated, events.GeneratedGroup, 16, 1.0)
            if batch:
                with ctx.busy("reward"):
                    work = [handle(ctx, group, msg, scorers, limits) for group, msg in batch]
                    await bus.hold(asyncio.gather(*work), [msg for _, msg in batch])
    finally:
        limits.close()
        await close_models(scorers)


async def handle(
    ctx: ServiceContext,
    group: events.GeneratedGroup,
    msg: Message,
    scorers: list[Scorer],
    limits: Limits,
) -> None:
    """Score one group, publish it, then ack its input: the fetched groups run concurrently."""
    with ctx.bus.process(msg):
        await deliver(ctx, await score_group(ctx, group, scorers, limits))
        faults.crash_point("reward.mid_batch")
        await msg.ack()
        ctx.clock.processed += 1


async def score_group(
    ctx: ServiceContext, group: events.GeneratedGroup, scorers: list[Scorer], limits: Limits
) -> Delivery:
    with telemetry.span("score"):
        start = time.monotonic()
        rewards = await score_samples(group.samples, scorers, ctx.config.reward.weights, limits)
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

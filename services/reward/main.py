"""Reward: generated groups in, scored groups out.

loop:
    pull generated groups (shared durable consumer: start more replicas to scale)
    score every sample with the recipe's @miles.reward functions (failures recorded, not raised)
    publish the scored group (train -> buffer, eval -> coordinator), then ack the input
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
                with telemetry.span("score"):
                    start = time.monotonic()
                    rewards = [await score(sample, ctx.recipe.rewards) for sample in group.samples]
                    for sample in group.samples:
                        if sample.failed:
                            log.warning("sample %s failed: %s", sample.sample_id, sample.error)
                    scored = events.ScoredGroup(
                        run_id=ctx.run_id,
                        policy_version=group.policy_version,
                        task_id=group.task_id,
                        split=group.split,
                        eval_round=group.eval_round,
                        samples=group.samples,
                        score_seconds=time.monotonic() - start,
                    )
                    record.scored(ctx.metrics, scored, rewards)
                subject = (
                    ctx.subjects.scored if group.split == "train" else ctx.subjects.eval_scored
                )
                try:
                    await bus.publish(subject, scored, msg_id=f"scored/{group.task_id}")
                except Oversized:  # dead-lettered; the coordinator dispatches a replacement
                    if group.split == "train":
                        await ctx.store.record_filtered(group.task_id, "oversized")
                faults.crash_point("reward.mid_batch")
                await msg.ack()
                ctx.clock.processed += 1

"""Coordinator: owns the run and paces it.

create the streams, consumers and the run record (idempotent: a restart resumes)
evaluate the initial policy
watch heartbeats: who is alive, who went silent
loop until N steps are committed and every evaluation is in:
    read the counters in Redis (committed steps, filtered groups) and dispatch training tasks
        while the staleness gate and the in-flight bound allow
    read the ledger: committed steps and filtered groups wake us, evaluation results arrive
    every K steps (and after the last), evaluate greedy accuracy on held-out prompts
mark the run finished and tell every service to stop
"""

from __future__ import annotations

import logging
import time

from miles import events
from miles.data import load_prompts
from miles.models import load_tokenizer
from miles.runtime.bus import Bus, Message
from miles.runtime.run_record import RunStorePort
from miles.runtime.service import ServiceContext
from miles.runtime.subjects import COORDINATOR_CONSUMER
from services.coordinator.evaluator import Evaluator
from services.coordinator.feed import Feed
from services.coordinator.sources import train_source
from services.coordinator.watch import Watch

log = logging.getLogger("miles.coordinator")


async def main(ctx: ServiceContext) -> None:
    config, bus, store = ctx.config, ctx.bus, ctx.store
    await bus.ensure_topology()
    # Not its infra URLs: they carry its passwords, and `miles status` (the operator) reads this.
    public = config.model_dump_json(exclude={"infra": {"nats_url", "redis_url"}})
    created = await store.create_run(config.hash(), public)
    # The prompts need it for chat templates and data.max_prompt_tokens, DPO's pairs always.
    tokenizer = load_tokenizer(config.model) if config.model.path is not None else None
    train = train_source(config, ctx.recipe, bus.subjects, ctx.run_id, tokenizer)
    held_out = load_prompts(config, ctx.recipe, "eval", tokenizer).prompts
    feed = await Feed.resume(bus, store, ctx.metrics, config, train)
    log.info("run %s %s at step %d", ctx.run_id, "created" if created else "resumed", feed.step)
    watch = Watch(bus, store, ctx.metrics, config.coordinator.heartbeat_seconds)
    await watch.start()
    inbox = await bus.pull("ledger", COORDINATOR_CONSUMER)
    evaluator = await Evaluator.resume(bus, store, config, held_out, ctx.instance)
    await evaluator.begin(feed.step)
    last_step = config.run.steps

    while not ctx.stopping.is_set():
        with ctx.busy():
            await watch.check()
            # on the counters refreshed at the end of the last round
            await feed.dispatch(evaluator.pending(feed.step))
        with ctx.waiting():
            arrived = await bus.fetch(inbox, events.Event, 64, 0.5)
        with ctx.busy():
            await read_ledger(bus, store, evaluator, arrived)
            await evaluator.write_overdue()
            await feed.refresh()
            if feed.step >= last_step and evaluator.complete:
                break

    if feed.step >= last_step:
        await finish(bus, store, feed.step, last_step)


async def read_ledger(
    bus: Bus, store: RunStorePort, evaluator: Evaluator, arrived: list[tuple[events.Event, Message]]
) -> None:
    """Each notice acked once the run record (or, for eval results, the round) holds it;
    filtered groups only wake the loop: the buffer recorded them already."""
    for event, msg in arrived:
        with bus.process(msg):
            if isinstance(event, events.StepCommitted):
                await store.update(reward_mean=event.reward_mean, loss=event.loss)
                await evaluator.after_step(event.step)
            elif isinstance(event, events.ScoredGroup):
                await evaluator.on_result(event)
            await msg.ack()


async def finish(bus: Bus, store: RunStorePort, step: int, last_step: int) -> None:
    await store.update(status="finished", finished=time.time())
    stop = events.Control(
        run_id=bus.run_id,
        policy_version=step,
        command="stop",
        reason=f"{last_step} steps committed",
    )
    await bus.broadcast(bus.subjects.control("stop"), stop)
    log.info("run %s finished: %d steps", bus.run_id, step)

"""Rollout: tasks in, generated sample groups out.

loop:
    pull tasks (the shared durable consumer spreads them over replicas), and whatever else
        arrives right behind them, up to rollout.tasks_per_fetch held in flight
    wait until the published weights reach the policy version the tasks ask for; if the
        engines are behind it, let the rounds in flight end, then load them
    with no round in flight: act on stragglers, load the newest weights
    start a round (in the background: rounds overlap): generate a group per task (default
        rollout, or the recipe's @miles.rollout), publish each group (JetStream-acked, deduped
        by task id), then ack its task

The decisions are pure code beside it: which engines need which weights (``weight_sync``),
which engine is a straggler (``stragglers``), how a batch is shared out (``groups``); the
rounds in flight live in ``rounds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time

from miles import events
from miles.engine.generation import EngineHandle
from miles.models import load_tokenizer
from miles.runtime import faults, raycluster
from miles.runtime.bus import Message, Oversized
from miles.runtime.service import ServiceContext
from miles.runtime.subjects import ROLLOUT_CONSUMER
from miles.telemetry import record
from miles.weights.follow import WeightsWatcher, make_blob_store
from services.rollout.fleet import EngineFleet
from services.rollout.groups import group_of, share_out
from services.rollout.rounds import Rounds, fetch_round
from services.rollout.stragglers import StragglerAction, engine_flagged
from services.rollout.weight_loading import WeightLoader
from services.rollout.weight_sync import version_needed

log = logging.getLogger("miles.rollout")


async def main(ctx: ServiceContext) -> None:
    config = ctx.config
    tokenizer = load_tokenizer(config.model)  # a ModelError when model.path is unset
    assert config.model.path is not None
    if config.rollout.engine != "simulated":  # simulated engines live in this process
        raycluster.connect(config.infra.ray_address, namespace=ctx.run_id)
    on_straggler = functools.partial(report_straggler, ctx)
    fleet = EngineFleet(
        config, config.model.path, tokenizer, ctx.instance, ctx.run_dir / "logs", on_straggler
    )
    await fleet.start()
    try:
        await serve(ctx, fleet)
    finally:
        await ctx.store.forget_engines(list(fleet.urls()))
        await fleet.shutdown()


async def serve(ctx: ServiceContext, fleet: EngineFleet) -> None:
    config, bus = ctx.config, ctx.bus
    await register_engines(ctx, fleet)
    blobs, watcher = make_blob_store(config, bus, ctx.run_dir), WeightsWatcher(bus)
    weights = WeightLoader(fleet, watcher, blobs, ctx.metrics, config.rollout.pushes_weights)
    await watcher.start()
    tasks = await bus.pull("tasks", ROLLOUT_CONSUMER)
    log.info("rollout %s ready with %d engine(s)", ctx.instance, len(fleet.engines))
    for family in (ctx.metrics.samples_generated, ctx.metrics.tokens_generated):
        record.expect(family, "engine", [handle.name for handle in fleet.handles])
    rounds = Rounds(ctx)
    try:
        while not ctx.stopping.is_set():
            room = config.rollout.tasks_per_fetch - rounds.held
            if room <= 0:  # holding all the tasks a replica takes
                await rounds.next_end()
                continue
            with ctx.waiting(bleed=weights.bleed) if rounds.idle else contextlib.nullcontext():
                batch = await fetch_round(bus, tasks, room, 1.0 if rounds.idle else 0.1)
            rounds.check()
            held = [msg for _, msg in batch]
            needed = version_needed(task for task, _ in batch)
            if watcher.version < needed:
                with ctx.waiting("weight_wait", weights.bleed):
                    await bus.hold(rounds.watching(watcher.wait_for(needed)), held)
            if fleet.weight_version < needed:  # engines finish their rounds before loading
                await bus.hold(rounds.drain(), held)
            if rounds.settled():
                await after_rounds(ctx, fleet)
            if rounds.idle:
                await weights.sync()
            if batch:
                faults.crash_soon("rollout.generating")
                rounds.start(generate_and_publish(ctx, fleet, batch), len(batch))
    finally:
        await rounds.cancel()


async def after_rounds(ctx: ServiceContext, fleet: EngineFleet) -> None:
    """With no round in flight: act on stragglers, re-register moved engines, export health."""
    await fleet.check_stragglers()
    await register_engines(ctx, fleet)  # replaced engines move
    record.engines(ctx.metrics, fleet.engine_health())


async def register_engines(ctx: ServiceContext, fleet: EngineFleet) -> None:
    if ctx.config.rollout.pushes_weights:  # the trainer pushes each version into these
        await ctx.store.register_engines(fleet.urls())


async def generate_and_publish(
    ctx: ServiceContext, fleet: EngineFleet, batch: list[tuple[events.Task, Message]]
) -> None:
    engines = fleet.active
    shares = share_out(batch, len(engines), ctx.recipe.rollout, ctx.config.rollout)
    work = asyncio.gather(*(fleet.run(e, s) for e, s in zip(engines, shares, strict=True)))
    started = time.time_ns()
    results = await ctx.bus.hold(work, [msg for _, msg in batch])
    await asyncio.gather(  # each group published, then its task acked; the groups concurrently
        *(
            deliver(ctx, task, msg, group_of(ctx.run_id, task, samples, generated), started)
            for share, generated in zip(shares, results, strict=True)
            for (task, msg), samples in zip(share.items, generated.groups, strict=True)
        )
    )


async def deliver(
    ctx: ServiceContext, task: events.Task, msg: Message, group: events.GeneratedGroup, started: int
) -> None:
    with ctx.bus.process(msg, start_time=started):  # the task's trace goes on
        finished = started + int(group.generate_seconds * 1e9)
        record.generated(ctx.metrics, group, started, finished)
        await publish(ctx, task, group)
        await msg.ack()
    ctx.clock.processed += 1


async def publish(ctx: ServiceContext, task: events.Task, group: events.GeneratedGroup) -> None:
    try:
        await ctx.bus.publish(ctx.subjects.generated, group, msg_id=f"gen/{task.task_id}")
    except Oversized:  # dead-lettered; the coordinator dispatches a replacement
        if task.split == "train":
            await ctx.store.record_filtered(task.task_id, "oversized")


async def report_straggler(
    ctx: ServiceContext, engine: EngineHandle, rate: float, median: float, action: StragglerAction
) -> None:
    """A straggler, for operators: an event on the bus and a count in the run record."""
    flagged = engine_flagged(ctx.run_id, engine, rate, median, action)
    await ctx.bus.broadcast(ctx.subjects.engines, flagged)
    await ctx.store.count_straggler(engine.name)

"""Rollout: tasks in, generated sample groups out.

loop:
    pull tasks (the shared durable consumer spreads them over replicas)
    wait until the engines hold the policy version the tasks ask for
    generate a group per task (default rollout, or the recipe's @miles.rollout)
    publish each group (JetStream-acked, deduped by task id), then ack its task
"""

from __future__ import annotations

import asyncio
import logging
import time

from transformers import AutoTokenizer

from miles import events, telemetry
from miles.engine.generation import EngineHandle, rollout_many
from miles.runtime import faults, raycluster
from miles.runtime.bus import Message, Oversized
from miles.runtime.service import ServiceContext
from miles.runtime.subjects import ROLLOUT_CONSUMER
from miles.telemetry import record
from miles.telemetry.record import BleedWindow
from miles.weights.blobs import BlobStore
from miles.weights.follow import WeightsWatcher, make_blob_store
from services.rollout.fleet import EngineFleet

log = logging.getLogger("miles.rollout")


async def main(ctx: ServiceContext) -> None:
    config, bus = ctx.config, ctx.bus
    assert config.model.path is not None, "model.path is required"
    raycluster.connect(config.infra.ray_address, namespace=ctx.run_id)
    tokenizer = AutoTokenizer.from_pretrained(config.model.path)
    fleet = EngineFleet(
        config,
        config.model.path,
        tokenizer,
        tag=ctx.instance,
        log_dir=ctx.run_dir / "logs",
        on_straggler=lambda *flag: report_straggler(ctx, *flag),
    )
    await fleet.start()
    if config.rollout.pushes_weights:  # the trainer pushes each version into these
        await ctx.store.register_engines(fleet.urls())
    blobs = make_blob_store(config, bus, ctx.run_dir)
    weights = WeightsWatcher(bus)
    await weights.start()
    tasks = await bus.pull("tasks", ROLLOUT_CONSUMER)
    log.info("rollout %s ready with %d engine(s)", ctx.instance, len(fleet.engines))
    names = [handle.name for handle in fleet.handles]
    record.expect(ctx.metrics.samples_generated, "engine", names)
    record.expect(ctx.metrics.tokens_generated, "engine", names)
    # The bleed, one window per policy version: the coordinator dispatches as far as the
    # staleness bound allows, so a rollout with no task, like one holding tasks for a newer
    # version, is waiting for the trainer's next weights.
    bleed = BleedWindow(ctx.metrics, "rollout_waiting_for_weights")

    try:
        while not ctx.stopping.is_set():
            with ctx.waiting(bleed=bleed):
                batch = await bus.fetch(tasks, events.Task, config.rollout.tasks_per_fetch, 1.0)
            if not batch:
                await sync_weights(ctx, fleet, weights, blobs, bleed)
                continue
            needed = max(task.policy_version for task, _ in batch)
            if weights.version < needed:
                with ctx.waiting("weight_wait", bleed):
                    await bus.hold(weights.wait_for(needed), [msg for _, msg in batch])
            await sync_weights(ctx, fleet, weights, blobs, bleed)
            with ctx.busy("rollout"):
                faults.crash_soon("rollout.generating")
                await generate_and_publish(ctx, fleet, batch)
                await fleet.check_stragglers()
                if config.rollout.pushes_weights:  # replaced engines move
                    await ctx.store.register_engines(fleet.urls())
                record.engines(ctx.metrics, fleet.engine_health())
    finally:
        await ctx.store.forget_engines(list(fleet.urls()))
        await fleet.shutdown()


async def report_straggler(
    ctx: ServiceContext, engine: EngineHandle, rate: float, median: float, action: str
) -> None:
    """A straggler, for operators: an event on the bus and a count in the run record."""
    flagged = events.EngineFlagged(
        run_id=ctx.run_id,
        policy_version=engine.weight_version,
        engine=engine.name,
        tokens_per_second=rate,
        fleet_median=median,
        action=action,
    )
    await ctx.bus.broadcast(ctx.subjects.engines, flagged)
    await ctx.store.count_straggler(engine.name)


async def sync_weights(
    ctx: ServiceContext,
    fleet: EngineFleet,
    weights: WeightsWatcher,
    blobs: BlobStore,
    bleed: BleedWindow,
) -> None:
    latest = weights.latest
    if latest is not None and latest.policy_version > fleet.weight_version:
        links = telemetry.links_from(headers=[weights.latest_headers])  # the trainer's publish
        version = {"miles.policy_version": latest.policy_version}
        with (
            ctx.metrics.phase("weight_load"),
            telemetry.linked_span("load weights", links, version),
        ):
            if ctx.config.rollout.pushes_weights:
                await fleet.refresh_versions()  # the trainer pushed before it announced
            if fleet.weight_version < latest.policy_version:  # blob path, or a missed push
                path = await blobs.get_dir(latest.uri, latest.sha256)  # verifies the sha256
                await fleet.load(path, latest.policy_version)
        ctx.metrics.policy_version.set(latest.policy_version)
        bleed.close()


async def generate_and_publish(
    ctx: ServiceContext, fleet: EngineFleet, batch: list[tuple[events.Task, Message]]
) -> None:
    engines = fleet.active
    shares = [batch[i :: len(engines)] for i in range(len(engines))]
    work = asyncio.gather(
        *(
            fleet.run(engine, lambda e, share=share: generate(ctx, e, share))  # type: ignore[misc]
            for engine, share in zip(engines, shares, strict=True)
        )
    )
    started = time.time_ns()
    results = await ctx.bus.hold(work, [msg for _, msg in batch])
    for share, (groups, seconds, engine) in zip(shares, results, strict=True):
        for (task, msg), samples in zip(share, groups, strict=True):
            group = events.GeneratedGroup(
                run_id=ctx.run_id,
                policy_version=min(s.policy_version_first for s in samples),
                task_id=task.task_id,
                split=task.split,
                eval_round=task.eval_round,
                samples=samples,
                engine=engine,
                generate_seconds=seconds,
            )
            with ctx.bus.process(msg, start_time=started):  # the task's trace goes on
                record.generated(ctx.metrics, group, started, started + int(seconds * 1e9))
                try:
                    subject = ctx.subjects.generated
                    await ctx.bus.publish(subject, group, msg_id=f"gen/{task.task_id}")
                except Oversized:  # dead-lettered; the coordinator dispatches a replacement
                    if task.split == "train":
                        await ctx.store.record_filtered(task.task_id, "oversized")
                await msg.ack()
            ctx.clock.processed += 1


async def generate(
    ctx: ServiceContext, engine: EngineHandle, share: list[tuple[events.Task, Message]]
) -> tuple[list[list[events.Sample]], float, str]:
    start = time.monotonic()
    tasks = [task for task, _ in share]
    if not tasks:
        return [], 0.0, engine.name
    custom = ctx.recipe.rollout
    if custom is None:
        groups = await rollout_many(engine, tasks, ctx.config.rollout)
    else:
        groups = list(await asyncio.gather(*(custom(engine, t, ctx.config.rollout) for t in tasks)))
    return groups, time.monotonic() - start, engine.name

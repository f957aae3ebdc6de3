"""Coordinator: owns the run and paces it.

create the streams, consumers and the run record (idempotent: a restart resumes)
evaluate the initial policy
watch heartbeats: who is alive, who went silent
follow an operator's commands (pause, resume, drain: services/coordinator/operator.py)
loop until N steps are committed and every evaluation is in, or a drain's step is:
    read the counters in Redis (committed steps, filtered groups) and dispatch training tasks
        while the staleness gate and the in-flight bound allow (not while paused)
    read the ledger: committed steps and filtered groups wake us, evaluation results arrive
    every K steps (and after the last), evaluate greedy accuracy on held-out prompts
mark the run finished (or drained) and tell every service to stop
(stopped before by a stop control event: mark the run stopped, and why)
"""

from __future__ import annotations

import functools
import logging
import time

from miles import events
from miles.data import load_prompts
from miles.models import load_tokenizer
from miles.runtime.bus import Bus, Message
from miles.runtime.run_record import RunStorePort
from miles.runtime.service import ServiceContext
from miles.runtime.subjects import COORDINATOR_CONSUMER, Subjects
from services.coordinator.evaluator import Evaluator
from services.coordinator.feed import Feed
from services.coordinator.operator import Commands
from services.coordinator.sources import train_source
from services.coordinator.watch import Watch

log = logging.getLogger("miles.coordinator")

LEDGER = (events.StepCommitted, events.GroupFiltered, events.ScoredGroup)
"""What the inbox takes, one type per subject of the ledger stream (``ledger_types``): anything
else there (a heartbeat sent to ``.steps``) is dead-lettered, not acked silently."""


def ledger_types(subjects: Subjects) -> dict[str, type[events.Event]]:
    return {
        subjects.steps: events.StepCommitted,
        subjects.filtered: events.GroupFiltered,
        subjects.eval_scored: events.ScoredGroup,
    }


async def main(ctx: ServiceContext) -> None:
    config, bus, store = ctx.config, ctx.bus, ctx.store
    await bus.ensure_topology()
    # Not its infra URLs: they carry its passwords, and `miles status` (the operator) reads this.
    public = config.model_dump_json(exclude={"infra": {"nats_url", "redis_url"}})
    created = await store.create_run(config.hash(), public)
    if not created and await store.status() in ("drained", "stopped"):  # resumed
        await store.update(status="running", stop_reason="", drain_step=0, paused=0)
    ctx.on_stop.append(functools.partial(record_stop, store))
    # The prompts need it for chat templates and data.max_prompt_tokens, DPO's pairs always.
    tokenizer = load_tokenizer(config.model) if config.model.path is not None else None
    train = train_source(config, ctx.recipe, bus.subjects, ctx.run_id, tokenizer)
    held_out = load_prompts(config, ctx.recipe, "eval", tokenizer).prompts
    feed = await Feed.resume(bus, store, ctx.metrics, config, train)
    log.info("run %s %s at step %d", ctx.run_id, "created" if created else "resumed", feed.step)
    commands = Commands()  # miles pause / resume / drain
    await commands.follow(bus)
    watch = Watch(bus, store, ctx.metrics, config.coordinator.heartbeat_seconds)
    await watch.start()
    inbox = await bus.pull("ledger", COORDINATOR_CONSUMER)
    evaluator = await Evaluator.resume(bus, store, config, held_out, ctx.instance)
    await evaluator.begin(feed.step)
    last_step = config.run.steps

    while not ctx.stopping.is_set():
        with ctx.busy():
            await watch.check()
            await commands.apply(store, feed)
            # on the counters refreshed at the end of the last round
            await feed.dispatch(evaluator.pending(feed.step))
        with ctx.waiting():
            arrived = await bus.fetch(inbox, LEDGER, 64, 0.5)
        with ctx.busy():
            await read_ledger(bus, store, evaluator, arrived)
            await evaluator.write_overdue()
            await feed.refresh()
            if feed.step >= last_step and evaluator.complete:
                break
            if feed.drained and feed.step < last_step:  # a drain to the last step finishes
                break

    if feed.step >= last_step:
        await finish(bus, store, feed.step, last_step)
    elif feed.drained:
        await drained(bus, store, feed.step)


async def read_ledger(
    bus: Bus, store: RunStorePort, evaluator: Evaluator, arrived: list[tuple[events.Event, Message]]
) -> None:
    """Each notice acked once the run record (or, for eval results, the round) holds it;
    filtered groups only wake the loop: the buffer recorded them already. A notice of another
    subject's type (an eval result sent to ``.steps``) is dead-lettered."""
    expected = ledger_types(bus.subjects)
    for event, msg in arrived:
        with bus.process(msg):
            if not isinstance(event, expected[msg.subject]):
                detail = f"expected {expected[msg.subject].__name__} on {msg.subject}, got "
                await bus.dead_letter(msg.subject, msg.data, "type", detail + type(event).__name__)
            elif isinstance(event, events.StepCommitted):
                await store.update(reward_mean=event.reward_mean, loss=event.loss)
                await evaluator.after_step(event.step)
            elif isinstance(event, events.ScoredGroup):
                await evaluator.on_result(event)
            await msg.ack()


async def drained(bus: Bus, store: RunStorePort, step: int) -> None:
    """Stop the run at a consistent manifest: everything dispatched is trained up to ``step``."""
    await store.update(status="drained")
    stop = events.Control(
        run_id=bus.run_id, policy_version=step, command="stop", reason=f"drained at step {step}"
    )
    await bus.broadcast(bus.subjects.control("stop"), stop)
    log.info("run %s drained at step %d; `miles run --resume` continues it", bus.run_id, step)


async def record_stop(store: RunStorePort, stop: events.Control) -> None:
    """A stop control event before the run finished: the record says so and why, for the last
    line of `miles run` and for `miles status`. The run's own stop (``finish``, ``drained``)
    leaves it."""
    if await store.status() == "running":
        await store.update(status="stopped", stop_reason=stop.reason or "no reason given")


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

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
from miles.runtime.service import ServiceContext
from miles.runtime.subjects import COORDINATOR_CONSUMER
from services.coordinator.evaluation import (
    EvalRound,
    dispatch_eval,
    record_result,
    recorded,
    summarize,
)
from services.coordinator.liveness import Liveness
from services.coordinator.pacing import Pacer

log = logging.getLogger("miles.coordinator")


async def main(ctx: ServiceContext) -> None:
    config, bus, store = ctx.config, ctx.bus, ctx.store
    await bus.ensure_topology()
    created = await store.create_run(config.hash(), config.model_dump_json())
    train = load_prompts(config, ctx.recipe, "train")
    held_out = load_prompts(config, ctx.recipe, "eval")
    pacer = await Pacer.resume(ctx, train)
    log.info("run %s %s at step %d", ctx.run_id, "created" if created else "resumed", pacer.step)
    liveness = Liveness(ctx)
    await liveness.start()
    inbox = await bus.pull("ledger", COORDINATOR_CONSUMER)
    rounds: dict[int, EvalRound] = {r: EvalRound.recorded_round(r) for r in await recorded(ctx)}
    if pacer.step not in rounds:
        rounds[pacer.step] = await dispatch_eval(ctx, pacer.step, held_out)
    last_step = config.run.steps

    while not ctx.stopping.is_set():
        with ctx.busy():
            await liveness.check()
            await pacer.dispatch()  # on the counters refreshed at the end of the last round
        with ctx.waiting():
            arrived = await bus.fetch(inbox, events.Event, 64, 0.5)
        with ctx.busy():
            for event, msg in arrived:
                with bus.process(msg):
                    if isinstance(event, events.StepCommitted):
                        await store.update(reward_mean=event.reward_mean, loss=event.loss)
                        due = event.step % config.coordinator.eval_every == 0
                        due = due or event.step == last_step
                        if due and event.step not in rounds and event.step <= last_step:
                            rounds[event.step] = await dispatch_eval(ctx, event.step, held_out)
                    elif isinstance(event, events.ScoredGroup):
                        record_result(rounds, event, config.coordinator.correct_reward)
                        done = rounds.get(event.eval_round)
                        if done is not None and done.complete and not done.recorded:
                            await record_round(ctx, done)
                    await msg.ack()
            for late in [r for r in rounds.values() if r.overdue]:
                log.warning(
                    "eval after step %d: %d of %d results after %.0fs; recording it partial",
                    late.round,
                    len(late.rewards),
                    len(late.task_ids),
                    config.coordinator.eval_timeout_seconds,
                )
                await record_round(ctx, late)
            await pacer.refresh()
            if pacer.step >= last_step and all(r.complete for r in rounds.values()):
                break

    if pacer.step >= last_step:
        await store.update(status="finished", finished=time.time())
        stop = events.Control(
            run_id=ctx.run_id,
            policy_version=pacer.step,
            command="stop",
            reason=f"{last_step} steps committed",
        )
        await bus.broadcast(ctx.subjects.control("stop"), stop)
        log.info("run %s finished: %d steps", ctx.run_id, pacer.step)


async def record_round(ctx: ServiceContext, done: EvalRound) -> None:
    result = summarize(done)
    done.recorded = True
    await ctx.store.add_eval(result)
    await ctx.store.update(accuracy=result["accuracy"], eval_step=done.round)
    log.info("eval after step %d: accuracy %.3f", done.round, result["accuracy"])

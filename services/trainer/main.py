"""Trainer: batches in, committed steps and new weights out.

loop:
    pull one batch
    if the ledger says it was trained: re-announce the step (idempotent) and ack
    train one step on the Ray actor
    write the weights (safetensors, HF names) to the blob store
    commit the step in Redis (ledger + record + version, one transaction)
    publish weights and step events (deduped by version), then ack the batch
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray

from miles import events, raycluster
from miles.bus import hold
from miles.service import ServiceContext
from miles.subjects import TRAINER_CONSUMER
from miles.weights import make_blob_store
from services.trainer.actor import TrainerActor

log = logging.getLogger("miles.trainer")


async def main(ctx: ServiceContext) -> None:
    config, bus, store = ctx.config, ctx.bus, ctx.store
    raycluster.connect(config.infra.ray_address, namespace=ctx.run_id)
    actor: Any = (
        ray.remote(TrainerActor)
        .options(num_cpus=config.trainer.num_cpus, max_restarts=0)
        .remote(str(ctx.recipe.path), config.model_dump_json())
    )
    blobs = make_blob_store(config, bus, ctx.run_dir)
    steps = await store.steps()
    if steps:  # a restarted trainer continues from the last committed weights
        latest = steps[-1]
        path = await blobs.get_dir(latest["weights_uri"], latest["weights_sha256"])
        await actor.load_weights.remote(str(path))
        log.info("trainer resumed at step %d from %s", latest["step"], latest["weights_uri"])
    step = len(steps)
    batches = await bus.pull("batches", TRAINER_CONSUMER)
    log.info("trainer %s ready at step %d", ctx.instance, step)

    while not ctx.stopping.is_set():
        wait_start = time.monotonic()
        with ctx.clock.waiting():  # trainer waiting for data: the other half of the bleed
            got = await bus.fetch(batches, events.Batch, 1, 1.0)
        if not got:
            continue
        batch, msg = got[0]
        if await store.trained(batch.batch_id):
            log.info("batch %s was trained already; re-announcing and acking", batch.batch_id)
            done = [r for r in await store.steps() if r["batch_id"] == batch.batch_id]
            await announce(ctx, done[0])
            await msg.ack()
            continue
        with ctx.clock.busy():
            seconds = {"wait_for_batch": time.monotonic() - wait_start}
            start = time.monotonic()
            metrics = await hold(actor.train_step.remote(batch.samples), [msg])
            seconds["train"] = time.monotonic() - start
            step += 1
            start = time.monotonic()
            staging = ctx.run_dir / "staging" / f"v{step}"
            sha256 = await actor.save_weights.remote(str(staging))
            uri = await blobs.put_dir(staging, f"weights/v{step}")
            seconds["save_weights"] = time.monotonic() - start
            record = step_record(step, batch, metrics, uri, sha256, seconds)
            if not await store.commit_step(step, record, batch.batch_id):
                raise RuntimeError(f"batch {batch.batch_id} committed twice: two trainers?")
            await announce(ctx, record)
            await msg.ack()
            ctx.clock.processed += 1
            log.info("step %d: loss %.4f reward %.3f", step, metrics["loss"], record["reward_mean"])


def step_record(
    step: int,
    batch: events.Batch,
    metrics: dict[str, Any],
    uri: str,
    sha256: str,
    seconds: dict[str, float],
) -> dict[str, Any]:
    rewards = [s.reward for s in batch.samples]
    return {
        "step": step,
        "policy_version": step,
        "batch_id": batch.batch_id,
        "task_ids": batch.task_ids,
        "sample_ids": [s.sample_id for s in batch.samples],
        "samples": len(batch.samples),
        "min_sample_version": min(s.policy_version for s in batch.samples),
        "reward_mean": sum(rewards) / len(rewards),
        "weights_uri": uri,
        "weights_sha256": sha256,
        "metrics": metrics,
        "seconds": seconds,
        "time": time.time(),
    }


async def announce(ctx: ServiceContext, record: dict[str, Any]) -> None:
    """Publish the weights and the step; ids make a repeat after a crash a no-op."""
    step = record["step"]
    weights = events.WeightsPublished(
        run_id=ctx.run_id,
        policy_version=step,
        uri=record["weights_uri"],
        sha256=record["weights_sha256"],
        step=step,
    )
    await ctx.bus.publish(ctx.subjects.weights, weights, msg_id=f"weights/v{step}")
    metrics = record["metrics"]
    committed = events.StepCommitted(
        run_id=ctx.run_id,
        policy_version=step,
        step=step,
        batch_id=record["batch_id"],
        task_ids=record["task_ids"],
        sample_ids=record["sample_ids"],
        reward_mean=record["reward_mean"],
        loss=float(metrics["loss"]),
        grad_norm=float(metrics.get("grad_norm", 0.0)),
        kl=float(metrics.get("kl", 0.0)),
        seconds=record["seconds"],
    )
    await ctx.bus.publish(ctx.subjects.steps, committed, msg_id=f"step/{step}")

"""Trainer: batches in, committed steps and new weights out.

resume from the latest manifest: its weights, its optimizer state and RNG
loop:
    pull one batch
    if the ledger says it was trained: re-announce its step (idempotent) and ack
    train one step on the Ray actor
    write the weights (every step) and the full state (every K steps) under unique names
    commit the manifest in Redis (written once; `latest` moves by compare-and-set)
    publish weights and step events (deduped by version), then ack the batch
    if the Ray actor died (and was restarted with the base model): nak the batch, resume the
    actor from the latest manifest, go on
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import AbstractContextManager
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from miles import events, telemetry
from miles.config import TrainerConfig
from miles.runtime import faults, raycluster
from miles.runtime.bus import Message
from miles.runtime.checkpoint import CommitRefused, Manifest
from miles.runtime.service import ServiceContext
from miles.runtime.subjects import TRAINER_CONSUMER
from miles.telemetry import record
from miles.weights.blobs import BlobStore
from miles.weights.follow import make_blob_store
from services.trainer.actor import StaleWeights, TrainerActor

log = logging.getLogger("miles.trainer")


async def main(ctx: ServiceContext) -> None:
    config, bus = ctx.config, ctx.bus
    raycluster.connect(config.infra.ray_address, namespace=ctx.run_id)
    actor: Any = (
        ray.remote(TrainerActor)
        .options(**trainer_resources(config.trainer))
        .remote(str(ctx.recipe.path), config.model_dump_json())
    )
    blobs = make_blob_store(config, bus, ctx.run_dir)
    step, state = position(await resume(actor, blobs, await ctx.manifests.latest()))
    batches = await bus.pull("batches", TRAINER_CONSUMER)
    log.info("trainer %s ready at step %d", ctx.instance, step)

    bleed = record.BleedWindow(ctx.metrics, "trainer_waiting_for_data")
    while not ctx.stopping.is_set():
        wait_start = time.monotonic()
        with ctx.waiting("buffer_wait", bleed):  # trainer waiting for data: half of the bleed
            got = await bus.fetch(batches, events.Batch, 1, 1.0)
        if not got:
            continue
        batch, msg = got[0]
        try:
            with bus.process(msg):
                if await ctx.manifests.trained(batch.batch_id):
                    await reannounce(ctx, batch, msg)
                    continue
                seconds = {"wait_for_batch": time.monotonic() - wait_start}
                manifest = await train(ctx, actor, blobs, batch, msg, step, state, seconds)
        except (RayActorError, StaleWeights) as lost:
            # Ray restarted the actor (or is restarting it) with the base model: load the
            # latest committed step into it; the batch comes back and is trained from there.
            log.warning("trainer actor lost its weights (%s); resuming it", lost)
            await msg.nak()
            await until_restarted(actor)
            step, state = position(await resume(actor, blobs, await ctx.manifests.latest()))
            continue
        step, state = position(manifest)
        bleed.close()
        log.info(
            "step %d: loss %.4f reward %.3f", step, manifest.metrics["loss"], manifest.reward_mean
        )


async def train(
    ctx: ServiceContext,
    actor: Any,
    blobs: BlobStore,
    batch: events.Batch,
    msg: Message,
    step: int,
    state: tuple[str | None, str | None, int],
    seconds: dict[str, float],
) -> Manifest:
    """Train ``batch`` from ``step``, write and commit step + 1, push, announce, then ack."""
    config, bus = ctx.config, ctx.bus
    links = telemetry.links_from(traceparents=batch.traceparents)  # every group's trace
    with ctx.busy(), telemetry.linked_span("train step", links, {"miles.step": step + 1}):
        started = time.monotonic()
        metrics = await bus.hold(actor.train_step.remote(batch.samples, step), [msg])
        seconds["train"] = time.monotonic() - started
        record.trained(ctx.metrics, batch.samples, metrics, version=step)
        faults.crash_point("trainer.stepped")
        step += 1
        start = time.monotonic()
        attempt = uuid.uuid4().hex[:8]  # a crashed attempt never overwrites what is read
        with ctx.metrics.phase("weight_publish"), version_span("publish weights", step):
            staging = ctx.run_dir / "staging" / f"v{step}-{attempt}"
            sha256 = await bus.hold(actor.save_weights.remote(str(staging), step), [msg])
            uri = await blobs.put_dir(staging, f"weights/v{step}-{attempt}")
        seconds["save_weights"] = time.monotonic() - start
        if step % config.trainer.checkpoint_every == 0:
            start = time.monotonic()
            with ctx.metrics.phase("checkpoint"), version_span("checkpoint", step):
                staging = ctx.run_dir / "staging" / f"state{step}-{attempt}"
                state_sha = await bus.hold(actor.save_state.remote(str(staging), step), [msg])
                state_uri = await blobs.put_dir(staging, f"state/s{step}-{attempt}")
            state = (state_uri, state_sha, step)
            seconds["save_state"] = time.monotonic() - start
        rewards = [s.reward for s in batch.samples]
        manifest = Manifest(
            run_id=ctx.run_id,
            step=step,
            policy_version=step,
            weights_uri=uri,
            weights_sha256=sha256,
            state_uri=state[0],
            state_sha256=state[1],
            state_step=state[2],
            batch_ids=[batch.batch_id],
            task_ids=batch.task_ids,
            sample_ids=[s.sample_id for s in batch.samples],
            dataset_cursor=int((await ctx.store.run()).get("cursor", 0)),
            rng_state=await actor.rng_state.remote(step),
            config_hash=config.hash(),
            samples=len(batch.samples),
            min_sample_version=min(s.policy_version for s in batch.samples),
            reward_mean=sum(rewards) / len(rewards),
            reward_histogram=record.reward_histogram(rewards),
            metrics={k: float(v) for k, v in metrics.items()},
            seconds=seconds,
        )
        await commit(ctx, manifest)
        faults.crash_point("trainer.committed")
        if config.rollout.pushes_weights:
            await push_weights(ctx, actor, step, msg)
        await announce(ctx, manifest)
        await msg.ack()
        ctx.clock.processed += 1
        ctx.metrics.commit_step(step, step, time.monotonic() - started)
    return manifest


async def until_restarted(actor: Any, timeout: float = 120.0) -> None:
    """Wait while Ray restarts the actor (calls fail fast meanwhile). An actor out of restarts
    raises ``ActorDiedError``: the service crashes and `miles run` restarts it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await actor.state_file_name.remote()
            return
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def reannounce(ctx: ServiceContext, batch: events.Batch, msg: Message) -> None:
    """A redelivered batch the ledger says was trained: announce its step again and ack."""
    done = await ctx.manifests.step_of(batch.batch_id)
    log.info("batch %s was trained in step %s; re-announcing", batch.batch_id, done and done.step)
    if done is not None:
        await announce(ctx, done)
    await msg.ack()


async def push_weights(ctx: ServiceContext, actor: Any, step: int, msg: Message) -> None:
    """Push the committed weights into the live engines before announcing them: an engine
    the push missed loads the same version from the blob store instead."""
    urls = await ctx.store.engine_urls()
    how = ctx.config.rollout.weight_sync
    with ctx.metrics.phase("weight_publish"), version_span(f"push weights ({how})", step):
        reached = await ctx.bus.hold(actor.push_weights.remote(urls, step), [msg])
    log.info("pushed v%d (%s) into %d of %d engine(s)", step, how, len(reached), len(urls))


def trainer_resources(trainer: TrainerConfig) -> dict[str, Any]:
    """The trainer actor's Ray options: all the resources for torch; for Megatron, whose ranks
    are their own actors, almost none (the ranks reserve theirs in a placement group), and no
    restart in place (a new actor would build a second rank group beside the dead one's)."""
    if trainer.backend == "megatron":
        return {"num_cpus": 0, "max_restarts": 0}
    return {
        "num_cpus": trainer.num_cpus,
        "num_gpus": trainer.num_gpus,
        "max_restarts": trainer.max_restarts,
    }


def position(latest: Manifest | None) -> tuple[int, tuple[str | None, str | None, int]]:
    """The step to train from and the last full state (uri, sha256, step), from a manifest."""
    if latest is None:
        return 0, (None, None, 0)
    return latest.step, (latest.state_uri, latest.state_sha256, latest.state_step)


def version_span(name: str, version: int) -> AbstractContextManager[object]:
    return telemetry.span(name, {"miles.policy_version": version})


async def resume(actor: Any, blobs: BlobStore, latest: Manifest | None) -> Manifest | None:
    """Load the latest committed weights, optimizer state and RNG into a fresh actor."""
    if latest is None:
        return None
    path = await blobs.get_dir(latest.weights_uri, latest.weights_sha256)
    await actor.load_weights.remote(str(path), latest.step)
    if latest.state_uri and latest.state_sha256:
        checked = await actor.state_file_name.remote()
        state = await blobs.get_dir(latest.state_uri, latest.state_sha256, checked=checked)
        await actor.load_state.remote(str(state))
    await actor.set_rng_state.remote(latest.rng_state)
    if latest.state_step != latest.step:
        log.warning(
            "resuming at step %d with optimizer moments from step %d (trainer.checkpoint_every)",
            latest.step,
            latest.state_step,
        )
    log.info("trainer resumed at step %d from %s", latest.step, latest.weights_uri)
    return latest


async def commit(ctx: ServiceContext, manifest: Manifest) -> None:
    """Commit the step; a commit whose reply was lost to a Redis restart is recognised as ours."""
    try:
        await ctx.manifests.commit(manifest)
    except CommitRefused as refused:
        ours = await ctx.manifests.get(manifest.step)
        if ours is None or ours.weights_uri != manifest.weights_uri:
            raise RuntimeError(f"{refused}: is another trainer serving run {ctx.run_id}?") from None
        log.info("step %d was committed by our own retried call", manifest.step)


async def announce(ctx: ServiceContext, manifest: Manifest) -> None:
    """Publish the weights and the step; ids make a repeat after a crash a no-op."""
    step = manifest.step
    weights = events.WeightsPublished(
        run_id=ctx.run_id,
        policy_version=step,
        uri=manifest.weights_uri,
        sha256=manifest.weights_sha256,
        step=step,
    )
    await ctx.bus.publish(ctx.subjects.weights, weights, msg_id=f"weights/v{step}")
    metrics = manifest.metrics
    committed = events.StepCommitted(
        run_id=ctx.run_id,
        policy_version=step,
        step=step,
        batch_id=manifest.batch_ids[0],
        task_ids=manifest.task_ids,
        sample_ids=manifest.sample_ids,
        reward_mean=manifest.reward_mean,
        loss=metrics["loss"],
        grad_norm=metrics.get("grad_norm", 0.0),
        kl=metrics.get("kl", 0.0),
        seconds=manifest.seconds,
    )
    await ctx.bus.publish(ctx.subjects.steps, committed, msg_id=f"step/{step}")

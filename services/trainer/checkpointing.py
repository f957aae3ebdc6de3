"""The trainer's writes, in the order a step makes them: weights, full state, commit, push,
announce. Each is one call on the actor, the blob store, Redis or the bus."""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager
from typing import Any

from miles import telemetry
from miles.runtime.bus import Message
from miles.runtime.checkpoint import CommitRefused, Manifest
from miles.runtime.service import ServiceContext
from miles.weights.blobs import BlobStore
from services.trainer.outcome import Weights, announcement, is_own_commit
from services.trainer.position import FullState, StepPlan

log = logging.getLogger("miles.trainer")


async def write_weights(
    ctx: ServiceContext,
    actor: Any,
    blobs: BlobStore,
    plan: StepPlan,
    msg: Message,
    seconds: dict[str, float],
) -> Weights:
    """The actor writes the step's HF weights to staging; the blob store moves them in."""
    start = time.monotonic()
    with ctx.metrics.phase("weight_publish"), version_span("publish weights", plan.step):
        staging = ctx.run_dir / "staging" / plan.weights_staging
        sha256 = await ctx.bus.hold(actor.save_weights.remote(str(staging), plan.step), [msg])
        uri = await blobs.put_dir(staging, plan.weights_name)
    seconds["save_weights"] = time.monotonic() - start
    return Weights(uri, sha256)


async def write_state(
    ctx: ServiceContext,
    actor: Any,
    blobs: BlobStore,
    plan: StepPlan,
    msg: Message,
    seconds: dict[str, float],
) -> FullState:
    """The optimizer moments and RNG after the step, as ``write_weights`` does the weights."""
    start = time.monotonic()
    with ctx.metrics.phase("checkpoint"), version_span("checkpoint", plan.step):
        staging = ctx.run_dir / "staging" / plan.state_staging
        sha256 = await ctx.bus.hold(actor.save_state.remote(str(staging), plan.step), [msg])
        uri = await blobs.put_dir(staging, plan.state_name)
    seconds["save_state"] = time.monotonic() - start
    return FullState(uri, sha256, plan.step)


async def dataset_cursor(ctx: ServiceContext) -> int:
    """Training prompts the coordinator had dispatched: the manifest's resume point for them."""
    return (await ctx.store.record()).cursor


async def commit(ctx: ServiceContext, manifest: Manifest) -> None:
    """Commit the step; a commit whose reply was lost to a Redis restart is recognised as ours."""
    try:
        await ctx.manifests.commit(manifest)
    except CommitRefused as refused:
        if not is_own_commit(manifest, await ctx.manifests.get(manifest.step)):
            raise RuntimeError(f"{refused}: is another trainer serving run {ctx.run_id}?") from None
        log.info("step %d was committed by our own retried call", manifest.step)


async def push_weights(ctx: ServiceContext, actor: Any, step: int, msg: Message) -> None:
    """Push the committed weights into the live engines before announcing them: an engine
    the push missed loads the same version from the blob store instead."""
    urls = await ctx.store.engine_urls()
    how = ctx.config.rollout.weight_sync
    with ctx.metrics.phase("weight_publish"), version_span(f"push weights ({how})", step):
        reached = await ctx.bus.hold(actor.push_weights.remote(urls, step), [msg])
    log.info("pushed v%d (%s) into %d of %d engine(s)", step, how, len(reached), len(urls))


async def announce(ctx: ServiceContext, manifest: Manifest) -> None:
    """Publish the weights, then the step; ids make a repeat after a crash a no-op."""
    events = announcement(manifest)
    await ctx.bus.publish(ctx.subjects.weights, events.weights, msg_id=events.weights_msg_id)
    await ctx.bus.publish(ctx.subjects.steps, events.step, msg_id=events.step_msg_id)


def version_span(name: str, version: int) -> AbstractContextManager[object]:
    return telemetry.span(name, {"miles.policy_version": version})

"""The trainer actor's life: its Ray resources, loading a committed step into it, and waiting
out a restart when it lost its weights."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ray.exceptions import ActorUnavailableError, RayActorError

from miles.config import TrainerConfig
from miles.runtime.bus import Message
from miles.runtime.checkpoint import Manifest
from miles.runtime.service import ServiceContext
from miles.weights.blobs import BlobStore
from services.trainer.actor import StaleWeights
from services.trainer.position import ResumeState

log = logging.getLogger("miles.trainer")

LOST_WEIGHTS = (RayActorError, StaleWeights)
"""The actor died (a call failed) or was restarted with the base model (a call named another
step): either way it no longer holds the committed weights. The service naks the batch, waits
out the restart, loads the latest committed step into the actor and trains the batch again."""


def trainer_resources(trainer: TrainerConfig) -> dict[str, Any]:
    """The trainer actor's Ray options: all the resources for torch; for Megatron and FSDP, whose
    ranks are their own actors, almost none (the ranks reserve theirs in a placement group), and
    no restart in place (a new actor would build a second rank group beside the dead one's)."""
    if trainer.backend in ("megatron", "fsdp"):
        return {"num_cpus": 0, "max_restarts": 0}
    return {
        "num_cpus": trainer.num_cpus,
        "num_gpus": trainer.num_gpus,
        "max_restarts": trainer.max_restarts,
    }


async def resume(actor: Any, blobs: BlobStore, latest: Manifest | None) -> ResumeState:
    """Load the latest committed weights, optimizer state and RNG into a fresh actor."""
    position = ResumeState.of(latest)
    if latest is None:
        return position
    path = await blobs.get_dir(latest.weights_uri, latest.weights_sha256)
    await actor.load_weights.remote(str(path), latest.step)
    if position.full_state is not None:
        checked = await actor.state_file_name.remote()
        full = position.full_state
        state = await blobs.get_dir(full.uri, full.sha256, checked=checked)
        await actor.load_state.remote(str(state))
    await actor.set_rng_state.remote(latest.rng_state)
    if position.moments_behind:
        log.warning(
            "resuming at step %d with optimizer moments from step %d (trainer.checkpoint_every)",
            latest.step,
            latest.state_step,
        )
    log.info("trainer resumed at step %d from %s", latest.step, latest.weights_uri)
    return position


async def recover(
    ctx: ServiceContext, actor: Any, blobs: BlobStore, msg: Message, lost: Exception
) -> ResumeState:
    """The actor lost its weights while ``msg``'s batch was in hand: give the batch back, wait
    while Ray restarts the actor with the base model, load the latest committed step into it.
    The batch comes back and is trained from there."""
    log.warning("trainer actor lost its weights (%s); resuming it", lost)
    await msg.nak()
    await until_restarted(actor)
    return await resume(actor, blobs, await ctx.manifests.latest())


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

"""Weights from the trainer straight into the engines: ``rollout.weight_sync = "distributed"``.

The trainer (rank 0) and every live engine form one process group through SGLang's
``/init_weights_update_group`` (gloo here, NCCL on GPUs); after each committed step the trainer
pauses the engines, broadcasts every tensor under its Hugging Face name with
``/update_weights_from_distributed`` and lets them continue. The group is formed again whenever
the set of engines changes (a rollout replica restarted, an engine was replaced).

Where the engine offers miles' checksum route (the CPU server), the trainer then compares a
sha256 per tensor with what it sent. The blob store is still written every step: it is what a
restarted trainer resumes from and what an engine that missed a broadcast loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Mapping

import torch

from miles.embedded import free_port
from miles.engine.sglang_client import (
    SGLangEngine,
    SGLangError,
    WeightUpdateGroup,
    broadcast_weights,
    join_weight_update_group,
)
from miles.engine.sglang_server import tensor_checksum

log = logging.getLogger("miles.trainer")
GROUP = "miles_weights"


class WeightBroadcaster:
    """Owned by the process holding the weights (the trainer actor); one group at a time."""

    def __init__(self, backend: str = "gloo") -> None:
        self.backend = backend
        self.urls: tuple[str, ...] = ()
        self.group: WeightUpdateGroup | None = None

    def send(self, urls: list[str], named: Mapping[str, torch.Tensor], version: int) -> list[str]:
        """Broadcast ``named`` to the engines at ``urls``; returns the urls that got it."""
        return asyncio.run(self._send(sorted(urls), named, version))

    async def _send(
        self, urls: list[str], named: Mapping[str, torch.Tensor], version: int
    ) -> list[str]:
        engines = [SGLangEngine(url, retries=0) for url in urls]
        try:
            alive = [e for e, ok in zip(engines, await _health(engines), strict=True) if ok]
            if not alive:
                return []
            live_urls = tuple(e.base_url for e in alive)
            if live_urls != self.urls or self.group is None:
                await self._regroup(alive)
            await asyncio.gather(*(e.pause_generation("in_place") for e in alive))
            try:
                await broadcast_weights(alive, self.group, named, GROUP, version)  # type: ignore[arg-type]
            finally:
                await asyncio.gather(*(e.continue_generation() for e in alive))
            await asyncio.gather(*(_verify(e, named) for e in alive))
            return list(live_urls)
        except (SGLangError, RuntimeError, OSError) as exc:
            self.urls, self.group = (), None  # a broken group is formed again next time
            log.warning("weight broadcast v%d failed (%s); engines fall back to disk", version, exc)
            return []
        finally:
            await asyncio.gather(*(e.aclose() for e in engines))

    async def _regroup(self, engines: list[SGLangEngine]) -> None:
        for engine in engines:  # an engine still in an old group must leave it first
            with contextlib.suppress(SGLangError):
                await engine.destroy_weights_update_group(GROUP)
        address = socket.gethostbyname(socket.gethostname())
        if all("127.0.0.1" in e.base_url for e in engines):
            address = "127.0.0.1"
        self.group = await join_weight_update_group(
            engines,
            address,
            free_port(""),
            GROUP,
            backend=self.backend,  # type: ignore[arg-type]
        )
        self.urls = tuple(e.base_url for e in engines)
        log.info("weight-update group formed with %d engine(s)", len(engines))


async def _health(engines: list[SGLangEngine]) -> list[bool]:
    return list(await asyncio.gather(*(e.health() for e in engines)))


async def _verify(engine: SGLangEngine, named: Mapping[str, torch.Tensor]) -> None:
    """Compare per-tensor sha256s where the engine can tell them (miles' CPU server)."""
    try:
        held = await engine.miles_weights_checksum()
    except SGLangError:
        return  # real SGLang has no such route: its own load path checks shapes and dtypes
    wrong = [name for name, t in named.items() if held.get(name) != tensor_checksum(t)]
    if wrong:
        raise SGLangError(f"{engine.base_url} holds other weights after the broadcast: {wrong[:3]}")


def unique_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One name per storage: tied weights (embeddings and LM head) are sent once."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            out[name] = tensor.detach().contiguous()
    return out

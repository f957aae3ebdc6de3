"""Weights from the trainer straight into the engines, after each committed step.

Two ways, chosen by ``rollout.weight_sync``; both pause the live engines, hand every tensor
over under its Hugging Face name, let them continue, then check what each engine holds:

- ``distributed``: the trainer (rank 0) and every live engine form one process group through
  SGLang's ``/init_weights_update_group`` (gloo here, NCCL on GPUs) and the trainer broadcasts
  each tensor; ``/update_weights_from_distributed`` announces names, dtypes and shapes. The group
  is formed again whenever the set of engines changes (a replica restarted, an engine replaced).
- ``tensor``: for engines on the trainer's node, ``/update_weights_from_tensor`` with handles to
  the trainer's own memory (CUDA IPC on GPUs, shared memory here): nothing is sent but names.

Where the engine offers miles' checksum route (the CPU server), the trainer then compares a
sha256 per tensor with what it sent. The blob store is still written every step: it is what a
restarted trainer resumes from and what an engine that missed a push loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Mapping
from typing import Protocol

import torch

from miles.engine.sglang_client import (
    SGLangClient,
    SGLangError,
    WeightUpdateGroup,
    broadcast_weights,
    join_weight_update_group,
)
from miles.engine.sglang_server import tensor_checksum
from miles.engine.shared_tensors import serialize_named_tensors
from miles.runtime.embedded import free_port

log = logging.getLogger("miles.trainer")
GROUP = "miles_weights"


class Transport(Protocol):
    """How tensors reach a set of live engines."""

    async def prepare(self, engines: list[SGLangClient]) -> None:
        """Before the engines pause: whatever the transport needs set up with them."""

    async def send(
        self, engines: list[SGLangClient], named: Mapping[str, torch.Tensor], version: int
    ) -> None: ...

    def reset(self) -> None:
        """Forget any state tied to the engines: the last send failed."""


class Broadcast:
    """``rollout.weight_sync = "distributed"``: one process group, formed per engine set."""

    def __init__(self, backend: str = "gloo") -> None:
        self.backend = backend
        self.urls: tuple[str, ...] = ()
        self.group: WeightUpdateGroup | None = None

    async def prepare(self, engines: list[SGLangClient]) -> None:
        urls = tuple(e.base_url for e in engines)
        if urls != self.urls or self.group is None:
            self.group = await self._regroup(engines)
            self.urls = urls

    async def send(
        self, engines: list[SGLangClient], named: Mapping[str, torch.Tensor], version: int
    ) -> None:
        assert self.group is not None, "prepare() forms the group"
        await broadcast_weights(engines, self.group, named, GROUP, version)

    def reset(self) -> None:
        self.urls, self.group = (), None

    async def _regroup(self, engines: list[SGLangClient]) -> WeightUpdateGroup:
        for engine in engines:  # an engine still in an old group must leave it first
            with contextlib.suppress(SGLangError):
                await engine.destroy_weights_update_group(GROUP)
        address = socket.gethostbyname(socket.gethostname())
        if all("127.0.0.1" in e.base_url for e in engines):
            address = "127.0.0.1"
        group = await join_weight_update_group(
            engines,
            address,
            free_port(""),
            GROUP,
            backend=self.backend,  # type: ignore[arg-type]
        )
        log.info("weight-update group formed with %d engine(s)", len(engines))
        return group


class SharedTensors:
    """``rollout.weight_sync = "tensor"``: handles to the trainer's memory, one payload per
    engine TP rank (every rank maps the full tensors and keeps its shard, as SGLang's loader
    does for a TP engine)."""

    def __init__(self, engine_tp: int = 1) -> None:
        self.engine_tp = engine_tp

    async def prepare(self, engines: list[SGLangClient]) -> None:
        pass

    async def send(
        self, engines: list[SGLangClient], named: Mapping[str, torch.Tensor], version: int
    ) -> None:
        payload = serialize_named_tensors(named)  # the tensors stay alive until every reply
        await asyncio.gather(
            *(e.update_weights_from_tensor([payload] * self.engine_tp, version) for e in engines)
        )

    def reset(self) -> None:
        pass


class WeightPush:
    """Owned by the process holding the weights (the trainer actor)."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def send(self, urls: list[str], named: Mapping[str, torch.Tensor], version: int) -> list[str]:
        """Push ``named`` into the engines at ``urls``; returns the urls that hold it."""
        return asyncio.run(self._send(sorted(urls), named, version))

    async def _send(
        self, urls: list[str], named: Mapping[str, torch.Tensor], version: int
    ) -> list[str]:
        engines = [SGLangClient(url, retries=0) for url in urls]
        try:
            alive = [e for e, ok in zip(engines, await _health(engines), strict=True) if ok]
            if not alive:
                return []
            await self.transport.prepare(alive)
            await asyncio.gather(*(e.pause_generation("in_place") for e in alive))
            try:
                await self.transport.send(alive, named, version)
            finally:
                await asyncio.gather(*(e.continue_generation() for e in alive))
            await asyncio.gather(*(_verify(e, named) for e in alive))
            return [e.base_url for e in alive]
        except (SGLangError, RuntimeError, OSError) as exc:
            self.transport.reset()  # a broken group is formed again next time
            log.warning("weight push v%d failed (%s); engines fall back to disk", version, exc)
            return []
        finally:
            await asyncio.gather(*(e.aclose() for e in engines))


async def _health(engines: list[SGLangClient]) -> list[bool]:
    return list(await asyncio.gather(*(e.health() for e in engines)))


async def _verify(engine: SGLangClient, named: Mapping[str, torch.Tensor]) -> None:
    """Compare per-tensor sha256s where the engine can tell them (miles' CPU server)."""
    try:
        held = await engine.miles_weights_checksum()
    except SGLangError:
        return  # real SGLang has no such route: its own load path checks shapes and dtypes
    wrong = [name for name, t in named.items() if held.get(name) != tensor_checksum(t)]
    if wrong:
        raise SGLangError(f"{engine.base_url} holds other weights after the push: {wrong[:3]}")


def unique_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One name per storage: tied weights (embeddings and LM head) are sent once."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            out[name] = tensor.detach().contiguous()
    return out

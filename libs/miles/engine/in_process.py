"""``EngineClient`` over a ``TransformersEngine`` in the caller's own process.

The engine is synchronous and CPU-bound; its calls run one at a time on a worker thread, so the
event loop stays free while it decodes and a weight update never interleaves with a batch. A
pause holds requests that arrive after it until ``continue_generation``, as SGLang does; a batch
already running finishes on the weights it started with (SGLang's ``in_place`` mode).

For tests, notebooks and a recipe's ``@miles.rollout`` tried without servers or Ray; the
rollout service's engines are server processes driven by ``SGLangClient``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from miles.engine.protocol import GenerateOutput, GenerateRequest
from miles.engine.transformers_engine import TransformersEngine

T = TypeVar("T")


class InProcessClient:
    """One ``TransformersEngine``, served through the async ``EngineClient`` calls."""

    def __init__(self, engine: TransformersEngine) -> None:
        self.engine = engine
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._running = asyncio.Event()  # cleared while paused
        self._running.set()

    async def _run(self, function: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def generate(self, requests: list[GenerateRequest]) -> list[GenerateOutput]:
        await self._running.wait()
        return await self._run(self.engine.generate, requests)

    async def update_weights_from_disk(self, model_path: str, weight_version: int) -> None:
        await self._run(self.engine.update_weights_from_disk, model_path, weight_version)

    async def pause_generation(self) -> None:
        self._running.clear()

    async def continue_generation(self) -> None:
        self._running.set()

    async def weight_version(self) -> int:
        return self.engine.weight_version()

    async def health(self) -> bool:
        try:
            return await self._run(self.engine.health)
        except RuntimeError:  # torch's errors (out of memory included) are RuntimeErrors
            return False

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

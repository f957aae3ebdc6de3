"""Run a function on N local ranks (``torch.multiprocessing``, spawn), without Ray.

For tests and single-machine tools: each rank is a fresh process that joins a gloo group on a
free loopback port, runs ``program(rank)`` and sends back its result. The cluster path is
``ray_group``; both end in the same ``distributed.initialize``.
"""

from __future__ import annotations

import pickle
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import torch.multiprocessing as mp

from miles.runtime.embedded import free_port
from miles.trainer.megatron import distributed
from miles.trainer.megatron.model import MegatronLayout

T = TypeVar("T")


def run_ranks(
    program: Callable[[int], T], layout: MegatronLayout, seed: int = 0, timeout: float = 300
) -> list[T]:
    """``[program(0), ..., program(world_size - 1)]``, each run in its own initialised rank.

    ``program`` must be picklable (a module-level function or a ``functools.partial`` of one).
    A rank that raises makes this raise with the rank's traceback.
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    init_method = f"tcp://127.0.0.1:{free_port()}"
    processes = [
        context.Process(target=_rank_main, args=(rank, layout, init_method, seed, program, results))
        for rank in range(layout.world_size)
    ]
    for process in processes:
        process.start()
    collected: dict[int, Any] = {}
    failures: list[str] = []
    deadline = time.monotonic() + timeout
    while len(collected) < len(processes):
        try:
            rank, ok, value = results.get(timeout=1.0)
        except queue.Empty:
            # A rank that dies before it can report (it cannot unpickle ``program``, say)
            # would otherwise leave the others waiting in a collective until the timeout.
            died = [r for r, p in enumerate(processes) if p.exitcode not in (None, 0)]
            if died:
                code = processes[died[0]].exitcode
                failures.append(f"rank {died[0]} exited ({code}) before reporting: see its stderr")
                break
            if time.monotonic() > deadline:
                failures.append(f"timed out after {timeout} s")
                break
            continue
        if not ok:
            failures.append(f"rank {rank}:\n{value}")
            break  # the other ranks are likely blocked in a collective with this one
        collected[rank] = pickle.loads(value)
    for process in processes:
        process.join(None if not failures else 5)
        if process.is_alive():
            process.terminate()
            process.join()
    if failures:
        raise RuntimeError("\n".join(failures))
    return [collected[rank] for rank in range(layout.world_size)]


def _rank_main(
    rank: int,
    layout: MegatronLayout,
    init_method: str,
    seed: int,
    program: Callable[[int], Any],
    results: Any,
) -> None:
    try:
        distributed.initialize(rank, layout, init_method, seed)
        value = program(rank)
        distributed.shutdown()
        # Pickled by value: a tensor sent as a shared-memory handle dies with this process.
        results.put((rank, True, pickle.dumps(value)))
    except Exception:  # noqa: BLE001 - reported to the parent, which raises it
        results.put((rank, False, traceback.format_exc()))

"""Rank actors in one Ray placement group: what the Megatron and FSDP groups share.

One bundle per rank (``PACK``: ranks share a node when they fit, which keeps gloo traffic on
loopback), one actor per bundle (``PlacementGroupSchedulingStrategy``), no restart in place (a
rank restarted alone could not rejoin its process group). A reservation the cluster cannot make
in time fails with one line that names the knobs to turn.
"""

from __future__ import annotations

from typing import Any

import ray
import ray.exceptions
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

PLACEMENT_TIMEOUT_SECONDS = 120.0


def place_ranks(
    actor_class: type, world_size: int, bundle: dict[str, float], what: str, knobs: str
) -> tuple[PlacementGroup, list[Any]]:
    """``world_size`` actors of ``actor_class``, one per bundle of a new placement group;
    ``what`` names them and ``knobs`` what to lower in the error when they do not fit."""
    group = placement_group([bundle] * world_size, strategy="PACK")
    try:
        ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_SECONDS)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise RuntimeError(
            f"cannot reserve {world_size} {what} x {bundle} within "
            f"{PLACEMENT_TIMEOUT_SECONDS:.0f}s; the cluster has "
            f"{ray.available_resources().get('CPU', 0):.2f} CPUs free: lower trainer.num_cpus, "
            f"rollout.engine_num_cpus or {knobs}"
        ) from None
    remote: Any = ray.remote(actor_class)
    ranks = [
        remote.options(
            num_cpus=bundle.get("CPU", 0),
            num_gpus=bundle.get("GPU", 0),
            max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=rank
            ),
        ).remote()
        for rank in range(world_size)
    ]
    return group, ranks

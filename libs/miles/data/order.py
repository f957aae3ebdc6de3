"""Which row the dataset cursor points at: epochs in a fresh order each, from the run's seed.

The order is a pure function of (seed, epoch), so the coordinator's cursor in Redis is all a
restarted coordinator needs to continue exactly where it stopped.
"""

from __future__ import annotations

import functools
import random


@functools.lru_cache(maxsize=4)
def permutation(size: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(size))
    random.Random(f"miles-data/{seed}/{epoch}").shuffle(order)
    return tuple(order)


def row_at(cursor: int, size: int, seed: int, shuffle: bool) -> int:
    """The row index of ``cursor``: epoch ``cursor // size``, its ``cursor % size``-th row."""
    epoch, offset = divmod(cursor, size)
    return permutation(size, seed, epoch)[offset] if shuffle else offset


def epoch_of(cursor: int, size: int) -> int:
    return cursor // size

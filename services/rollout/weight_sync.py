"""Which engines need which weights: the latest ``WeightsPublished`` against each engine's version.

The trainer announces every version with a ``WeightsPublished`` (a blob URI and its sha256).
With ``rollout.pushes_weights`` it first pushes the tensors straight into the engines, so an
engine may hold the version before the rollout hears of it: the rollout asks the engines which
version they hold, and loads the blob only into the ones still behind (a push it missed: it was
restarting, was replaced, or the push failed). Without pushes, every engine behind loads the
blob.

Pure: the rollout's loop does the asking and loading (``main.sync_weights``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from miles import events


@dataclass(frozen=True)
class WeightSync:
    """Moving the fleet to one published version."""

    published: events.WeightsPublished
    ask_engines: bool
    """The trainer pushes weights: ask the engines what they hold before loading anything."""

    @property
    def version(self) -> int:
        return self.published.policy_version

    def behind(self, versions: Sequence[int]) -> list[int]:
        """The engines (by index) still under the version: they load the blob."""
        return engines_behind(self.version, versions)


def plan_sync(
    latest: events.WeightsPublished | None, versions: Sequence[int], pushes_weights: bool
) -> WeightSync | None:
    """A sync when some engine holds older weights than the latest published; else ``None``."""
    if latest is None or not engines_behind(latest.policy_version, versions):
        return None
    return WeightSync(latest, ask_engines=pushes_weights)


def engines_behind(version: int, versions: Sequence[int]) -> list[int]:
    return [index for index, held in enumerate(versions) if held < version]


def version_needed(tasks: Iterable[events.Task]) -> int:
    """The newest policy version a batch of tasks asks for (0 for none): generation waits."""
    return max((task.policy_version for task in tasks), default=0)

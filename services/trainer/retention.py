"""Which steps' files the blob store keeps: pure decisions over the latest committed step, the
retention settings, the leases and what the store holds.

Three readers need old files, and each bounds how far back it can reach:

- a resume reads the latest manifest: its weights and the full state it names (which, with
  ``trainer.checkpoint_every`` K > 1, may be up to K - 1 steps older);
- a rollout engine loads the newest weights it was told of, and re-loads the version it holds
  after a restart. With ``buffer.max_staleness`` k, the batch of step L was generated at
  versions >= L - 1 - k, so engines hold or are loading one of the last k + 2 versions
  (L - k - 1 .. L; the newest may be committed and not announced yet);
- an export reads one step's weights, under a lease (``ManifestsPort.lease``).

Beyond those, ``trainer.keep_checkpoints`` keeps the last N steps whole (weights and state).
Everything else of a committed step, and any file of a committed step that its manifest does not
name (an attempt that crashed before its commit), is garbage. Files of steps after the latest
are never touched: they may be the attempt in progress.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from miles.config import MilesConfig

FAMILIES = {"weights": "v", "state": "s"}
"""The blob-name families a step writes, and their leaves' prefix (``position.StepPlan``):
``weights/v<step>-<attempt>``, ``state/s<step>-<attempt>``."""


@dataclass(frozen=True)
class Retention:
    keep_checkpoints: int
    """Steps kept whole; 0 keeps every step (nothing is collected)."""
    max_staleness: int

    @classmethod
    def of(cls, config: MilesConfig) -> Retention:
        return cls(config.trainer.keep_checkpoints, config.buffer.max_staleness)

    @property
    def collects(self) -> bool:
        return self.keep_checkpoints > 0

    def weights_kept(self, latest: int) -> range:
        """Steps whose weights stay: the checkpoints kept, and the versions engines may load."""
        window = max(self.keep_checkpoints, self.max_staleness + 2)
        return range(max(1, latest - window + 1), latest + 1)

    def checkpoints_kept(self, latest: int) -> range:
        """Steps whose full state (the one their manifest names) stays; the latest's at least."""
        return range(max(1, latest - max(self.keep_checkpoints, 1) + 1), latest + 1)


@dataclass(frozen=True)
class StoredBlob:
    """One blob the store holds, by name: ``<family>/<v|s><step>-<attempt>``."""

    name: str
    family: str
    step: int

    @property
    def leaf(self) -> str:
        return self.name.rsplit("/", 1)[-1]

    @classmethod
    def parse(cls, name: str) -> StoredBlob | None:
        """None for a name no trainer writes (left alone)."""
        family, _, leaf = name.partition("/")
        number = leaf[1:].split("-", 1)[0]
        if leaf[:1] != FAMILIES.get(family) or not number.isdigit():
            return None
        return cls(name, family, int(number))


def collectable_steps(
    stored_steps: Iterable[int], latest: int, retention: Retention, leased: set[int]
) -> list[int]:
    """The committed steps whose weights may be deleted: outside what ``retention`` keeps and
    held by no lease."""
    if not retention.collects:
        return []
    kept = retention.weights_kept(latest)
    return sorted({s for s in stored_steps if s <= latest and s not in kept and s not in leased})


def garbage(stored: Iterable[StoredBlob], latest: int, referenced: set[str]) -> list[StoredBlob]:
    """The blobs of committed steps that no kept manifest names (``referenced``: leaves of the
    weights and states the kept steps' manifests name), oldest first."""
    found = [b for b in stored if b.step <= latest and b.leaf not in referenced]
    return sorted(found, key=lambda blob: (blob.step, blob.name))


def leaf_of(uri: str) -> str:
    """The last part of a blob URI (``file:///.../weights/v3-ab`` -> ``v3-ab``)."""
    return uri.rstrip("/").rsplit("/", 1)[-1]

"""Following the policy's weights: the latest ``WeightsPublished`` event, fetched and verified."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from miles import events
from miles.config import MilesConfig
from miles.runtime.bus import Bus
from miles.weights.blobs import BlobStore, DirBlobStore, ObjectBlobStore

log = logging.getLogger(__name__)


def blob_bucket(run_id: str) -> str:
    """The run's JetStream Object Store bucket (``permissions.blob_bucket`` names it too)."""
    return f"miles_{run_id}_blobs"


def make_blob_store(config: MilesConfig, bus: Bus, run_dir: Path) -> BlobStore:
    if config.infra.blob_store == "nats":
        return ObjectBlobStore(bus, blob_bucket(bus.run_id), run_dir / "blob-cache")
    return DirBlobStore(blob_dir(config, bus.run_id, run_dir))


def blob_dir(config: MilesConfig, run_id: str, run_dir: Path) -> Path:
    """The run's own directory: ``<run>/blobs``, or a subdirectory of a shared
    ``infra.blob_dir`` named after the run, so that collecting one run's old steps never
    touches another's files."""
    shared = config.infra.blob_dir
    return shared / run_id if shared else run_dir / "blobs"


class WeightsWatcher:
    """Tracks the newest published version; every replica sees every update (ordered consumer)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.latest: events.WeightsPublished | None = None
        self.latest_headers: dict[str, str] = {}
        """The NATS headers ``latest`` came with: its trace context, to link the load to."""
        self.changed = asyncio.Event()

    async def start(self) -> None:
        published = await self.bus.subscribe_latest(self.bus.subjects.weights)

        async def follow() -> None:
            async for msg in published:
                try:
                    event = events.decode(msg.data, events.WeightsPublished, self.bus.run_id)
                except events.BadEvent as exc:
                    await self.bus.dead_letter(msg.subject, msg.data, exc.reason, exc.detail)
                    continue
                if self.latest is None or event.policy_version > self.latest.policy_version:
                    self.latest = event
                    self.latest_headers = dict(msg.headers or {})
                    self.changed.set()

        self._task = asyncio.create_task(follow())

    @property
    def version(self) -> int:
        return self.latest.policy_version if self.latest else 0

    async def wait_for(self, version: int) -> None:
        while self.version < version:
            self.changed.clear()
            await self.changed.wait()

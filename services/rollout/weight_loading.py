"""Keeping the fleet on the newest published weights: ask the engines, fetch the blob, load.

``weight_sync`` decides; this carries it out, under a ``load weights`` span linked to the
trainer's publish, and keeps the rollout's bleed: its time waiting for weights, one window per
policy version.
"""

from __future__ import annotations

from miles import telemetry
from miles.telemetry import Metrics
from miles.telemetry.record import BleedWindow
from miles.weights.blobs import BlobStore
from miles.weights.follow import WeightsWatcher
from services.rollout.fleet import EngineFleet
from services.rollout.weight_sync import plan_sync


class WeightLoader:
    def __init__(
        self,
        fleet: EngineFleet,
        watcher: WeightsWatcher,
        blobs: BlobStore,
        metrics: Metrics,
        pushes_weights: bool,
    ) -> None:
        self.fleet = fleet
        self.watcher = watcher
        self.blobs = blobs
        self.metrics = metrics
        self.pushes_weights = pushes_weights
        # The coordinator dispatches as far as the staleness bound allows, so a rollout with no
        # task, like one holding tasks for a newer version, is waiting for the trainer's next
        # weights.
        self.bleed = BleedWindow(metrics, "rollout_waiting_for_weights")

    async def sync(self) -> None:
        """Move every engine behind the latest published version onto it."""
        sync = plan_sync(self.watcher.latest, self.fleet.versions(), self.pushes_weights)
        if sync is None:
            return
        links = telemetry.links_from(headers=[self.watcher.latest_headers])  # the trainer's publish
        version = {"miles.policy_version": sync.version}
        with (
            self.metrics.phase("weight_load"),
            telemetry.linked_span("load weights", links, version),
        ):
            if sync.ask_engines:
                await self.fleet.refresh_versions()  # the trainer pushed before it announced
            if sync.behind(self.fleet.versions()):  # blob path, or a missed push
                published = sync.published
                path = await self.blobs.get_dir(published.uri, published.sha256)  # verifies it
                await self.fleet.load(path, sync.version)
        self.metrics.policy_version.set(sync.version)
        self.bleed.close()

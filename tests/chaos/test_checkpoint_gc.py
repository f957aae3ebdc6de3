"""Kill -9 the trainer in the middle of collecting old steps' files; the run must finish with
nothing lost, and the blob store must end holding exactly what is kept, whole.

trainer.keep_checkpoints = 1 keeps one full checkpoint and, with max_staleness 0, the weights of
the last two versions: after step 2 commits the full state of step 1 goes, after step 3 the
weights of step 1 and the full state of step 2. The trainer dies between those two (the second
file deleted in its life). Its batch was acked before the collection, so the restarted trainer
resumes from step 3, whose files no collection touches, verifies them, finishes the collection
at start and trains on.
"""

from __future__ import annotations

import asyncio

import pytest

from miles.runtime.checkpoint import Manifest
from miles.weights.blobs import DirBlobStore

from .conftest import STEPS, Chaos

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.extended]


def test_trainer_killed_mid_collection_resumes_and_leaves_only_what_is_kept(chaos: Chaos) -> None:
    run_id = "trainer-mid-gc"
    finished = chaos.run(
        run_id, crash_at="trainer.mid_gc@2", settings=["trainer.keep_checkpoints=1"]
    )
    assert finished.returncode == 0, finished.output[-4000:]
    assert chaos.marker(run_id).exists(), "trainer.mid_gc was never reached: nothing was tested"
    assert finished.summary["restarts"]["trainer"] >= 1
    assert "trainer resumed at step 3" in finished.log("trainer")

    found = chaos.audit(run_id)
    assert found.violations(STEPS, max_staleness=0) == []
    assert found.acknowledged and not found.dead

    blobs = DirBlobStore(finished.run_dir / "blobs")
    kept = found.manifests[-2:]
    assert asyncio.run(blobs.names("weights")) == sorted(weights_name(m) for m in kept)
    assert asyncio.run(blobs.names("state")) == [state_name(found.manifests[-1])]
    for manifest in kept:  # whole: every file a kept manifest names verifies
        asyncio.run(blobs.get_dir(manifest.weights_uri, manifest.weights_sha256))
    latest = found.manifests[-1]
    assert latest.state_uri and latest.state_sha256
    asyncio.run(blobs.get_dir(latest.state_uri, latest.state_sha256, checked="trainer_state.pt"))


def weights_name(manifest: Manifest) -> str:
    return "weights/" + manifest.weights_uri.rsplit("/", 1)[-1]


def state_name(manifest: Manifest) -> str:
    assert manifest.state_uri is not None
    return "state/" + manifest.state_uri.rsplit("/", 1)[-1]

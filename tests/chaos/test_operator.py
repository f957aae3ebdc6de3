"""An operator's commands on a running run (`miles pause`, `resume`, `drain`), as typed
``Control`` events through the bus: a pause stops dispatching while the run is up, a resume
starts it again, a drain stops the run at a committed step with nothing in flight, and
`miles run --resume` finishes it with nothing lost, nothing trained twice and the same weights
as a run nobody touched."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import redis

from miles.cli.run import DRAINED
from miles.runtime.run_record import RunRecord
from miles.runtime.store import RunKeys

from .conftest import STEPS, Chaos

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.extended]


def record(chaos: Chaos, run_id: str) -> RunRecord:
    client = redis.Redis.from_url(chaos.redis.url, decode_responses=True)
    try:
        return RunRecord.decode(client.hgetall(RunKeys(run_id).record))  # type: ignore[arg-type]
    finally:
        client.close()


def weights(chaos: Chaos, run_id: str) -> list[str]:
    found = chaos.audit(run_id)
    assert found.violations(STEPS, max_staleness=0) == []
    assert found.acknowledged and not found.dead
    return [m.weights_sha256 for m in found.manifests]


def test_pause_resume_and_drain_a_running_run(chaos: Chaos) -> None:
    run_id = "operated"
    said: dict[str, subprocess.CompletedProcess[str]] = {}
    cursors: list[int] = []

    root = [str(chaos.root)]

    def miles(command: str) -> None:
        urls = ["--nats-url", chaos.nats.url, "--redis-url", chaos.redis.url]
        said[command] = subprocess.run(
            [sys.executable, "-m", "miles.cli", command, run_id, "--output-dir", *root, *urls],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def operate(process: subprocess.Popen[str]) -> None:
        deadline = time.monotonic() + 120
        while record(chaos, run_id).step < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        miles("pause")
        time.sleep(2.0)  # what was in flight trains; nothing new goes out
        cursors.append(record(chaos, run_id).cursor)
        time.sleep(3.0)
        cursors.append(record(chaos, run_id).cursor)
        miles("resume")
        miles("drain")

    drained = chaos.run(run_id, during=operate)
    for command in ("pause", "resume", "drain"):
        assert said[command].returncode == 0, said[command].stdout + said[command].stderr
    assert "paused at step" in said["pause"].stdout
    assert cursors[0] == cursors[1], "a paused run dispatched"
    assert drained.returncode == DRAINED, drained.output[-3000:]
    stopped = record(chaos, run_id)
    assert stopped.status == "drained" and stopped.step < STEPS
    assert stopped.step == stopped.drain_step
    assert f"miles run --resume {run_id}" in drained.output

    finished = chaos.run(run_id, resume=True)
    assert finished.returncode == 0, finished.output[-3000:]
    assert record(chaos, run_id).status == "finished"
    untouched = chaos.run("untouched")
    assert untouched.returncode == 0, untouched.output[-3000:]
    assert weights(chaos, run_id) == weights(chaos, "untouched")

"""What the supervisor of `miles run` says when a run ends before it finished: the reason it
returns is the launcher's last line (with the resume command) and its exit code 1."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from miles.cli.ending import why_unfinished
from miles.cli.outage import Outage
from miles.cli.run import Child, Supervisor
from miles.runtime.run_record import RunRecord
from miles.runtime.store import RunKeys

RUN = "supervised"


class RecordOnly:
    """The reads ``RunView.read`` makes, over one run record hash and nothing else."""

    def __init__(self, record: dict[str, str]) -> None:
        self.record = record

    def hgetall(self, key: str) -> dict[str, str]:
        return self.record if key == RunKeys(RUN).record else {}

    def get(self, key: str) -> None:
        return None

    def lrange(self, key: str, start: int, end: int) -> list[str]:
        return []

    def hincrby(self, key: str, field: str, amount: int) -> int:
        return amount


def child(tmp_path: Path, service: str, *argv: str) -> Child:
    started = Child(service, list(argv), tmp_path / f"{service}.log", dict(os.environ))
    started.backoff = 0.0  # restart at once: the test is about when it gives up
    started.start()
    return started


def supervise(children: list[Child], record: dict[str, str]) -> str | None:
    supervisor = Supervisor(children, [], RecordOnly(record), RUN, 60, Outage(30.0))  # type: ignore[arg-type]
    try:
        return supervisor.run(quiet=True)
    finally:
        for each in children:
            each.stop()


def test_a_stop_control_event_ends_the_run_with_its_reason(tmp_path: Path) -> None:
    coordinator = child(tmp_path, "coordinator", sys.executable, "-c", "")  # exits 0, as on a stop
    record = {"status": "stopped", "stop_reason": "operator: maintenance", "step": "20"}
    assert (
        supervise([coordinator], record)
        == "stopped by a stop control event at step 20/60 (operator: maintenance)"
    )


def test_a_finished_run_has_no_reason(tmp_path: Path) -> None:
    coordinator = child(tmp_path, "coordinator", sys.executable, "-c", "")
    assert supervise([coordinator], {"status": "finished", "step": "60"}) is None


def test_a_service_it_gives_up_on_ends_the_run_with_its_log(tmp_path: Path) -> None:
    coordinator = child(tmp_path, "coordinator", "sleep", "60")
    rollout = child(tmp_path, "rollout", "sh", "-c", "kill -9 $$")
    why = supervise([coordinator, rollout], {"status": "running", "step": "3"})
    assert why == (
        f"rollout crashed 6 times in a row, last with exit code -9 (log: {tmp_path}/rollout.log)"
    )
    assert rollout.restarts == 6


def test_a_coordinator_that_exits_without_a_record_of_why_says_where_it_stopped() -> None:
    record = RunRecord.decode({"status": "running", "step": "7"})
    why = why_unfinished(record, 60)
    assert why == "the coordinator exited at step 7/60 (run status 'running')"

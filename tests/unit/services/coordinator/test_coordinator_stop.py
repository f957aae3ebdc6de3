"""A stop control event before the last step is recorded as such, with its reason: the
services all exit 0 on it, so the record is where `miles run` learns the run did not finish."""

from __future__ import annotations

from miles import events
from miles.runtime.memory_store import MemoryRun, MemoryRunStore
from services.coordinator.main import record_stop


def stop(reason: str) -> events.Control:
    return events.Control(run_id="run", policy_version=3, command="stop", reason=reason)


async def test_a_stop_before_the_end_marks_the_run_stopped_and_why() -> None:
    store = MemoryRunStore(MemoryRun("run"))
    await store.create_run("hash", "{}")
    await record_stop(store, stop("operator: maintenance"))
    record = await store.record()
    assert (record.status, record.stop_reason) == ("stopped", "operator: maintenance")


async def test_the_runs_own_stop_after_the_last_step_leaves_it_finished() -> None:
    store = MemoryRunStore(MemoryRun("run"))
    await store.create_run("hash", "{}")
    await store.update(status="finished")
    await record_stop(store, stop("3 steps committed"))
    record = await store.record()
    assert (record.status, record.stop_reason) == ("finished", "")

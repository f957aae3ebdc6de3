"""The coordinator's inbox takes only its notices, each on its own subject: anything else is
dead-lettered with its reason and counted, never acked silently (a heartbeat sent to
``.steps`` once was)."""

from __future__ import annotations

from miles import events
from miles.config import load_config
from miles.runtime.bus import MemoryBroker, MemoryBus
from miles.runtime.memory_store import MemoryRun, MemoryRunStore
from miles.runtime.subjects import COORDINATOR_CONSUMER
from services.coordinator.evaluator import Evaluator
from services.coordinator.main import LEDGER, read_ledger

RUN = "run"


def step(number: int) -> events.StepCommitted:
    return events.StepCommitted(
        run_id=RUN,
        policy_version=number,
        step=number,
        batch_id=f"b{number}",
        task_ids=[],
        sample_ids=[],
        reward_mean=0.5,
        loss=0.1,
        grad_norm=1.0,
        kl=0.0,
    )


def beat() -> events.Heartbeat:
    return events.Heartbeat(
        run_id=RUN,
        policy_version=-1,
        service="rollout",
        instance="host-1",
        pid=1,
        time=1.0,
        busy_seconds=0.0,
        wait_seconds=0.0,
        processed=0,
    )


async def test_an_event_the_inbox_does_not_expect_is_dead_lettered_and_counted() -> None:
    bus = MemoryBus(MemoryBroker(), RUN, "coordinator")
    await bus.ensure_topology()
    store = MemoryRunStore(MemoryRun(RUN))
    await store.create_run("hash", "{}")
    bus.on_dead_letter = store.count_dead_letter
    subjects = bus.subjects
    filtered = events.GroupFiltered(run_id=RUN, policy_version=0, task_id="t9", reason="stale")
    await bus.publish(subjects.steps, beat(), msg_id="forged-beat")
    await bus.publish(subjects.steps, step(1), msg_id="step-1")
    await bus.publish(subjects.steps, filtered, msg_id="forged-filtered")
    await bus.publish(subjects.filtered, filtered, msg_id="filtered-t9")
    inbox = await bus.pull("ledger", COORDINATOR_CONSUMER)
    evaluator = await Evaluator.resume(
        bus, store, load_config(overrides=["run.steps=3"]), [], "host-1"
    )

    arrived = await bus.fetch(inbox, LEDGER, 64, 0.01)
    await read_ledger(bus, store, evaluator, arrived)

    assert [type(event).__name__ for event, _ in arrived] == [
        "StepCommitted",
        "GroupFiltered",
        "GroupFiltered",
    ]
    assert await store.dead_letters() == {"type": 2}
    assert (await store.record()).reward_mean == 0.5
    assert await bus.fetch(inbox, LEDGER, 64, 0.01) == []  # every message acked

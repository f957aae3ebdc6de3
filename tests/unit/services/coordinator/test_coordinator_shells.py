"""The coordinator's shells over the in-memory bus and run record: the feed publishes what the
pacing allows and records its cursor, the evaluator publishes a round and writes it once."""

from __future__ import annotations

import asyncio

from miles import events
from miles.config import MilesConfig, load_config
from miles.data import Prompt
from miles.runtime.bus import MemoryBroker, MemoryBus
from miles.runtime.memory_store import MemoryRun, MemoryRunStore
from miles.runtime.run_record import EvalResult
from miles.runtime.subjects import ROLLOUT_CONSUMER
from miles.telemetry import Metrics
from services.coordinator.evaluator import Evaluator
from services.coordinator.feed import Feed
from services.coordinator.operator import Commands, obey
from services.coordinator.sources import Prompts, Source

PROMPTS = [Prompt(f"{i}+1=", str(i + 1)) for i in range(6)]


async def twins(run_id: str = "run") -> tuple[MemoryBus, MemoryRunStore]:
    bus = MemoryBus(MemoryBroker(), run_id, "coordinator")
    await bus.ensure_topology()
    store = MemoryRunStore(MemoryRun(run_id))
    await store.create_run("hash", "{}")
    return bus, store


async def published(bus: MemoryBus) -> list[events.Task]:
    tasks = await bus.pull("tasks", ROLLOUT_CONSUMER)
    got = await bus.fetch(tasks, events.Task, 100, 0.01)
    for _, msg in got:
        await msg.ack()
    return [task for task, _ in got]


def tasks(bus: MemoryBus) -> Source:
    return Prompts(bus.subjects, "run", PROMPTS, group_size=4, seed=0)


def config(*overrides: str) -> MilesConfig:
    return load_config(
        overrides=["buffer.groups_per_batch=2", "buffer.max_staleness=0", "run.steps=3", *overrides]
    )


async def test_the_feed_dispatches_to_the_gate_and_replaces_a_filtered_group() -> None:
    bus, store = await twins()
    feed = await Feed.resume(bus, store, Metrics("coordinator", "run"), config(), tasks(bus))
    await feed.dispatch()
    await feed.dispatch()  # the gate holds: nothing more
    assert [(t.task_id, t.policy_version) for t in await published(bus)] == [("t0", 0), ("t1", 0)]
    assert (await store.record()).cursor == 2

    await store.update(step=1, policy_version=1, trained_groups=2)
    await store.record_filtered("t2", "zero_variance")
    await feed.refresh()
    await feed.dispatch()
    assert [t.task_id for t in await published(bus)] == ["t2", "t3", "t4"]
    assert (await store.record()).cursor == 5


async def test_a_restarted_feed_resumes_at_the_recorded_cursor() -> None:
    bus, store = await twins()
    await store.update(cursor=1)
    feed = await Feed.resume(bus, store, Metrics("coordinator", "run"), config(), tasks(bus))
    await feed.dispatch()
    assert [(t.task_id, t.prompt) for t in await published(bus)] == [("t1", "1+1=")]


async def test_a_round_missing_results_is_written_partial_after_the_timeout() -> None:
    bus, store = await twins()
    now = [100.0]
    settings = config("coordinator.eval_timeout_seconds=5")
    evaluator = await Evaluator.resume(bus, store, settings, PROMPTS[:2], "host-1", lambda: now[0])
    await evaluator.begin(0)
    tasks = await published(bus)
    assert [t.task_id for t in tasks] == ["eval0-0-host-1", "eval0-1-host-1"]
    sample = events.Sample(
        sample_id=f"{tasks[0].task_id}/0",
        prompt=tasks[0].prompt,
        label=tasks[0].label,
        prompt_ids=[1],
        response_ids=[2],
        response_logprobs=[-0.1],
        response_text=tasks[0].label,
        finish_reason="stop",
        policy_version_first=0,
        policy_version_last=0,
        reward=1.0,
    )
    scored = events.ScoredGroup(
        run_id="run",
        policy_version=0,
        task_id=tasks[0].task_id,
        split="eval",
        eval_round=0,
        samples=[sample],
    )
    await evaluator.on_result(scored)
    now[0] = 105.0
    await evaluator.write_overdue()
    assert await store.evals() == [] and not evaluator.complete
    now[0] = 105.5
    await evaluator.write_overdue()
    [result] = await store.evals()
    assert isinstance(result, EvalResult)
    assert (result.round, result.n, result.expected, result.accuracy) == (0, 1, 2, 1.0)
    record = await store.record()
    assert (record.accuracy, record.eval_step) == (1.0, 0) and evaluator.complete

    restarted = await Evaluator.resume(bus, store, config(), PROMPTS[:2], "host-2")
    await restarted.begin(0)  # recorded: not run again
    assert await published(bus) == []


# --- an operator's commands (services/coordinator/operator.py) ------------------------------


def command(name: str) -> events.Control:
    return events.Control(run_id="run", policy_version=0, command=name)  # type: ignore[arg-type]


async def test_paused_nothing_is_dispatched_until_resumed() -> None:
    bus, store = await twins()
    feed = await Feed.resume(bus, store, Metrics("coordinator", "run"), config(), tasks(bus))
    await obey(store, feed, command("pause"))
    assert (await store.record()).paused == 1 and feed.paused
    await feed.dispatch()
    assert await published(bus) == []

    await obey(store, feed, command("resume"))
    await feed.dispatch()
    assert [t.task_id for t in await published(bus)] == ["t0", "t1"]


async def test_a_drain_completes_the_steps_in_flight_and_no_more() -> None:
    """k = 1: steps 1 and 2 are in flight (4 groups) when the drain comes; a filtered group is
    replaced, nothing of step 3 is dispatched, and the run is drained once step 2 commits."""
    bus, store = await twins()
    metrics = Metrics("coordinator", "run")
    feed = await Feed.resume(bus, store, metrics, config("buffer.max_staleness=1"), tasks(bus))
    await feed.dispatch()
    assert len(await published(bus)) == 4
    await obey(store, feed, command("drain"))
    assert (await store.record()).drain_step == 2

    await store.update(step=1, policy_version=1, trained_groups=2)
    await store.record_filtered("t2", "zero_variance")
    await feed.refresh()
    await feed.dispatch()  # without the drain, step 3's two groups would go too
    assert [t.task_id for t in await published(bus)] == ["t4"]
    assert not feed.drained
    await store.update(step=2, policy_version=2, trained_groups=4)
    await feed.refresh()
    assert feed.drained

    await obey(store, feed, command("resume"))  # cancels the drain
    assert not feed.drained and (await store.record()).drain_step == 0


async def test_commands_wait_for_the_coordinators_loop_and_stop_is_not_theirs() -> None:
    bus, store = await twins()
    feed = await Feed.resume(bus, store, Metrics("coordinator", "run"), config(), tasks(bus))
    commands = Commands()
    await commands.follow(bus)
    await bus.broadcast(bus.subjects.control("pause"), command("pause"))
    await bus.broadcast(bus.subjects.control("stop"), command("stop"))
    await asyncio.sleep(0.05)
    assert not (await store.record()).paused  # the loop applies it, not the callback
    await commands.apply(store, feed)
    assert (await store.record()).paused == 1 and commands.queue.empty()

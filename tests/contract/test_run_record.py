"""The run record contract: one suite, run against Redis ("redis") and the in-memory twins
("memory").

What a service relies on: a run created once per config, its record read back typed, evaluations
and heartbeats as structs, counters (dead letters, filtered groups counted once per task,
restarts, stragglers), engines, batch plans that survive a restarted buffer, and step commits
that are exactly-once: refused for a batch already trained, for any step but latest + 1, and
for a step whose manifest exists, with nothing changed by a refusal; and leases that keep a
step's weights from collection, atomically with marking steps collected.
"""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from contract.record_harness import Client, RecordHarness, manifest

from miles import events
from miles.runtime.checkpoint import CommitRefused
from miles.runtime.run_record import BatchPlan, EvalResult, RunRecord


def heartbeat(run_id: str, instance: str, time: float, processed: int) -> events.Heartbeat:
    return events.Heartbeat(
        run_id=run_id,
        policy_version=-1,
        service="reward",
        instance=instance,
        pid=1,
        time=time,
        busy_seconds=1.0,
        wait_seconds=2.0,
        processed=processed,
        metrics={'miles_bleed_ratio{side="trainer_waiting_for_data"}': 0.25},
    )


@pytest.fixture
async def run(record_harness: RecordHarness) -> Client:
    """A process on a run the coordinator created."""
    client = await record_harness.connect()
    await client.store.create_run("h", "{}")
    return client


# --- the run record --------------------------------------------------------------------------


async def test_a_run_not_created_reads_as_its_defaults(record_harness: RecordHarness) -> None:
    store = (await record_harness.connect()).store
    assert await store.record() == RunRecord()
    assert await store.status() is None
    assert await store.policy_version() == 0


async def test_create_run_is_idempotent_for_one_config(record_harness: RecordHarness) -> None:
    store = (await record_harness.connect()).store
    assert await store.create_run("hash-a", '{"lr": 1}') is True
    record = await store.record()
    assert (record.run_id, record.config_hash, record.status) == (
        record_harness.run_id,
        "hash-a",
        "running",
    )
    assert (record.step, record.policy_version, record.cursor) == (0, 0, 0)
    assert record.started is not None and record.finished is None
    assert await store.status() == "running"
    await store.update(cursor=5)
    restarted = (await record_harness.connect()).store  # a restarted coordinator
    assert await restarted.create_run("hash-a", '{"lr": 1}') is False
    again = await restarted.record()
    assert again.cursor == 5  # a restart does not reset the run
    assert again.started == record.started


async def test_create_run_refuses_another_config(record_harness: RecordHarness) -> None:
    store = (await record_harness.connect()).store
    await store.create_run("hash-a", "{}")
    with pytest.raises(ValueError, match="hash-a"):
        await store.create_run("hash-b", "{}")
    assert (await store.record()).config_hash == "hash-a"


async def test_updates_read_back_typed(run: Client) -> None:
    await run.store.update(reward_mean=0.625, loss=-0.015625, accuracy=0.75, eval_step=4)
    await run.store.update(status="finished", finished=1234.5)
    record = await run.store.record()
    assert (record.reward_mean, record.loss, record.accuracy, record.eval_step) == (
        0.625,
        -0.015625,
        0.75,
        4,
    )
    assert (record.status, record.finished) == ("finished", 1234.5)
    assert await run.store.status() == "finished"


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"cursr": 5}, ValueError),  # a name the typed read would drop
        ({"cursor": "five"}, msgspec.ValidationError),  # a value it would fail on
    ],
)
async def test_an_update_the_record_cannot_read_back_is_refused(
    run: Client, fields: dict[str, str | int], error: type[Exception]
) -> None:
    before = await run.store.record()
    with pytest.raises(error):
        await run.store.update(**fields)
    assert await run.store.record() == before


async def test_evaluations_are_kept_in_order(run: Client) -> None:
    results = [
        EvalResult(
            round=step,
            after_step=step,
            policy_versions=[step],
            accuracy=0.25 * (step + 1),
            reward_mean=0.5,
            n=3,
            expected=4,
            time=100.0 + step,
        )
        for step in (0, 2)
    ]
    assert await run.store.evals() == []
    for result in results:
        await run.store.add_eval(result)
    assert await run.store.evals() == results


async def test_heartbeats_are_listed(record_harness: RecordHarness, run: Client) -> None:
    run_id = record_harness.run_id
    await run.store.heartbeat(heartbeat(run_id, "h-1", 100.0, 3))
    await run.store.heartbeat(heartbeat(run_id, "h-2", 100.0, 4))
    later = heartbeat(run_id, "h-1", 101.0, 5)
    await run.store.heartbeat(later)  # a later beat of the same instance replaces the earlier one
    services = await (await record_harness.connect()).store.services()
    assert set(services) == {"reward/h-1", "reward/h-2"}
    assert services["reward/h-1"] == later
    assert (services["reward/h-1"].processed, services["reward/h-1"].time) == (5, 101.0)
    assert services["reward/h-2"].processed == 4


async def test_counters(record_harness: RecordHarness, run: Client) -> None:
    store = run.store
    await store.count_dead_letter("pickle")
    await store.count_dead_letter("pickle")
    assert await store.record_filtered("t1", "stale") is True
    assert await store.record_filtered("t1", "stale") is False  # a redelivered group: once
    assert await store.record_filtered("t1", "zero_variance") is False  # whatever the reason
    assert await store.record_filtered("t2", "zero_variance") is True
    assert await store.dead_letters() == {"pickle": 2}
    assert await store.filtered() == {"stale": 1, "zero_variance": 1}
    assert await store.filtered_groups() == 2
    assert await store.restarts() == {}
    await record_harness.count_restart("rollout")
    await record_harness.count_restart("rollout")
    assert await store.restarts() == {"rollout": 2}
    await store.count_straggler("engine-1")
    assert await store.stragglers() == {"engine-1": 1}


async def test_engines_register_and_leave(run: Client) -> None:
    store = run.store
    await store.register_engines({})
    assert await store.engine_urls() == []
    await store.register_engines({"e1": "http://b:1", "e0": "http://a:1", "e2": "http://a:1"})
    assert await store.engine_urls() == ["http://a:1", "http://b:1"]  # sorted, once each
    await store.forget_engines(["e0", "e1", "never-registered"])
    assert await store.engine_urls() == ["http://a:1"]
    await store.forget_engines([])
    assert await store.engine_urls() == ["http://a:1"]


async def test_batch_plans_survive_for_a_restarted_buffer(
    record_harness: RecordHarness, run: Client
) -> None:
    store = run.store
    assert await store.batch_plans([]) == {}
    assert await store.batch_plans(["t1", "t2", "t3"]) == {}
    await store.plan_batch("b-1", ["t1", "t2"])
    restarted = (await record_harness.connect()).store
    plans = await restarted.batch_plans(["t1", "t3", "t2"])
    planned = BatchPlan("b-1", ["t1", "t2"], published=False)
    assert plans == {"t1": planned, "t2": planned}
    await store.mark_published("b-1", ["t1", "t2"])
    published = BatchPlan("b-1", ["t1", "t2"], True)
    assert (await restarted.batch_plans(["t2"]))["t2"] == published
    await restarted.plan_batch("b-1", ["t1", "t2"])  # planned again: the plan made stays
    assert await restarted.batch_plans(["t1"]) == {"t1": published}


# --- step commits ----------------------------------------------------------------------------


async def test_commit_moves_latest_and_the_run_record(
    record_harness: RecordHarness, run: Client
) -> None:
    manifests, run_id = run.manifests, record_harness.run_id
    assert await manifests.latest() is None
    assert await manifests.latest_step() == 0
    assert await manifests.all() == []
    first, second = manifest(run_id, 1, "b-1"), manifest(run_id, 2, "b-2")
    await manifests.commit(first)
    await manifests.commit(second)
    reader = (await record_harness.connect()).manifests
    assert await reader.all() == [first, second]  # every field, as committed
    assert await reader.latest_step() == 2
    latest = await reader.latest()
    assert latest is not None and latest.batch_ids == ["b-2"] and latest.dataset_cursor == 4
    assert await reader.get(1) == first
    assert await reader.get(3) is None
    assert await reader.trained("b-1") and not await reader.trained("b-3")
    record = await run.store.record()
    assert (record.step, record.policy_version) == (2, 2)
    assert (record.trained_groups, record.trained_samples) == (4, 6)
    assert await run.store.policy_version() == 2
    found = await reader.step_of("b-1")
    assert found is not None and found.step == 1
    assert await reader.step_of("b-3") is None


@pytest.mark.parametrize(
    ("step", "batch_id", "reason"),
    [
        (2, "b-1", "trained"),  # a redelivered batch: never trained twice
        (1, "b-9", "not_next"),  # backwards
        (3, "b-9", "not_next"),  # a gap
    ],
)
async def test_refused_commits_change_nothing(
    record_harness: RecordHarness, run: Client, step: int, batch_id: str, reason: str
) -> None:
    manifests, run_id = run.manifests, record_harness.run_id
    await manifests.commit(manifest(run_id, 1, "b-1"))
    before = await run.store.record()
    with pytest.raises(CommitRefused) as refused:
        await manifests.commit(manifest(run_id, step, batch_id))
    assert (refused.value.reason, refused.value.latest) == (reason, 1)
    assert await manifests.latest_step() == 1
    assert [m.batch_ids for m in await manifests.all()] == [["b-1"]]
    assert not await manifests.trained("b-9")
    assert await run.store.record() == before


async def test_a_manifest_is_written_once(record_harness: RecordHarness, run: Client) -> None:
    """Even with `latest` behind (as if its move were lost), SET NX keeps the first manifest."""
    await record_harness.plant_manifest(1, b'{"step": 1}')
    before = await run.store.record()
    with pytest.raises(CommitRefused, match="exists") as refused:
        await run.manifests.commit(manifest(record_harness.run_id, 1, "b-1"))
    assert (refused.value.reason, refused.value.latest) == ("exists", 0)
    assert await record_harness.manifest_text(1) == '{"step": 1}'
    assert await run.manifests.latest_step() == 0
    assert not await run.manifests.trained("b-1")
    assert await run.store.record() == before


async def test_racing_trainers_commit_each_step_once(
    record_harness: RecordHarness, run: Client
) -> None:
    """Two writers race for the same steps: every step has one winner, no step is skipped."""
    run_id = record_harness.run_id

    async def writer(name: str) -> list[int]:
        manifests = (await record_harness.connect()).manifests  # its own process
        won = []
        for step in range(1, 21):
            try:
                await manifests.commit(manifest(run_id, step, f"b-{step}-{name}", uri=name))
                won.append(step)
            except CommitRefused:
                pass
            await asyncio.sleep(0)  # the other writer's turn (the twin never awaits otherwise)
        return won

    a, b = await asyncio.gather(writer("a"), writer("b"))
    assert sorted(a + b) == list(range(1, 21))
    committed = await run.manifests.all()
    assert [m.step for m in committed] == list(range(1, 21))
    for m in committed:
        assert m.weights_uri == ("a" if m.step in a else "b")
    record = await run.store.record()
    assert (record.step, record.trained_groups, record.trained_samples) == (20, 40, 60)


# --- leases and collection -------------------------------------------------------------------


async def test_a_leased_step_is_not_collected_and_a_collected_step_is_not_leased(
    run: Client,
) -> None:
    manifests = run.manifests
    assert await manifests.lease(2, "export-a", 60)
    assert await manifests.lease(2, "export-b", 60)  # two readers of one step
    assert await manifests.leased() == {2}
    assert await manifests.condemn([1, 2, 3]) == [1, 3]
    assert [await manifests.collected(step) for step in (1, 2, 3)] == [True, False, True]
    assert not await manifests.lease(3, "export-c", 60)  # its weights are going

    await manifests.release(2, "export-a")
    assert await manifests.condemn([2]) == []  # export-b still reads it
    await manifests.release(2, "export-b")
    assert await manifests.leased() == set()
    assert await manifests.condemn([2]) == [2]
    assert await manifests.condemn([2]) == [2]  # marking again is harmless (a retried collection)
    assert await manifests.condemn([]) == []


async def test_a_lease_expires(run: Client) -> None:
    assert await run.manifests.lease(5, "export-a", 0.2)
    assert await run.manifests.leased() == {5}
    await asyncio.sleep(0.4)
    assert await run.manifests.leased() == set()
    assert await run.manifests.condemn([5]) == [5]

"""Each service's ``main`` run in-process by ``run_service`` against real NATS, Redis and Ray.

The test plays every other service: it publishes the service's input events and reads its
output streams through the durable consumers the real downstream service would bind.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import pytest
import pytest_asyncio
from nats.js import JetStreamContext

from miles import events
from miles.config import MilesConfig, load_config
from miles.recipe import Recipe, load_recipe
from miles.runtime import embedded
from miles.runtime.bus import NatsBus, connect_nats
from miles.runtime.checkpoint import Manifest, Manifests
from miles.runtime.run_record import RunRecord
from miles.runtime.service import ServiceContext, run_service
from miles.runtime.store import RunStore, connect_redis
from miles.runtime.subjects import (
    BUFFER_CONSUMER,
    COORDINATOR_CONSUMER,
    REWARD_CONSUMER,
    ROLLOUT_CONSUMER,
    TRAINER_CONSUMER,
)
from miles.shards import WEIGHTS_FILE, sha256_file
from miles.weights import batches
from miles.weights.blobs import DirBlobStore
from services.buffer.main import main as buffer_main
from services.coordinator.main import main as coordinator_main
from services.reward.main import main as reward_main
from services.rollout.main import main as rollout_main
from services.trainer.main import main as trainer_main

pytestmark = pytest.mark.integration
E = TypeVar("E", bound=events.Event)
Main = Callable[[ServiceContext], Awaitable[None]]

RECIPE = """
import math

import miles


@miles.reward
def exact(sample: miles.Sample) -> float:
    if sample.label == "raise":
        raise RuntimeError("reward exploded")
    if sample.label == "nan":
        return math.nan
    if sample.label == "verbose":
        raise RuntimeError("a very long complaint " * 60)
    return float(sample.response_text == sample.label)
"""


class Harness:
    """One run: the test's own bus and store, and the services it runs as `miles serve` would."""

    def __init__(
        self, config: MilesConfig, recipe: Recipe, run_dir: Path, bus: NatsBus, store: RunStore
    ) -> None:
        self.config, self.recipe, self.run_dir = config, recipe, run_dir
        self.bus, self.store = bus, store
        self.run_id = bus.run_id
        self.subjects = bus.subjects
        self.services: list[asyncio.Task[None]] = []

    @classmethod
    async def open(cls, config: MilesConfig, recipe: Recipe, run_dir: Path) -> Harness:
        run_id = f"t{uuid.uuid4().hex[:10]}"
        assert config.infra.nats_url and config.infra.redis_url
        nc = await connect_nats(config.infra.nats_url, 5, name="test")
        bus = NatsBus(nc, run_id, "test", config.infra.max_payload_bytes)
        await bus.ensure_topology()  # the coordinator's job; services wait for it otherwise
        store = RunStore(await connect_redis(config.infra.redis_url, 5), run_id)
        await store.create_run(config.hash(), config.model_dump_json())
        return cls(config, recipe, run_dir, bus, store)

    def start(self, service: str, main: Main) -> None:
        self.services.append(
            asyncio.create_task(
                run_service(service, main, self.config, self.recipe, self.run_id, self.run_dir)
            )
        )

    def check_alive(self) -> None:
        for task in self.services:
            if task.done():
                task.result()  # a crash surfaces as the test's error
                raise AssertionError(f"{task} returned before it was told to stop")

    async def publish(self, subject: str, event: events.Event, msg_id: str | None = None) -> None:
        await self.bus.publish(subject, event, msg_id or uuid.uuid4().hex)

    async def collect(
        self,
        subscription: JetStreamContext.PullSubscription,
        expected: type[E],
        count: int,
        timeout: float = 20,
    ) -> list[E]:
        """Exactly ``count`` events (acked), or fail after ``timeout`` seconds."""
        got: list[E] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            self.check_alive()
            assert time.monotonic() < deadline, f"got {len(got)} of {count} {expected.__name__}"
            for event, msg in await self.bus.fetch(subscription, expected, count - len(got), 0.5):
                got.append(event)
                await msg.ack()
        return got

    async def nothing_more(
        self, subscription: JetStreamContext.PullSubscription, seconds: float
    ) -> None:
        extra = await self.bus.fetch(subscription, events.Event, 10, seconds)
        assert extra == [], f"unexpected: {[event for event, _ in extra]}"

    async def wait_for(self, condition: Callable[[], Awaitable[bool]], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not await condition():
            self.check_alive()
            assert time.monotonic() < deadline, "condition not met in time"
            await asyncio.sleep(0.1)

    async def consumer(self, stream_kind: str, durable: str):  # type: ignore[no-untyped-def]
        return await self.bus.js.consumer_info(self.subjects.stream(stream_kind), durable)

    async def stored(self, stream_kind: str) -> int:
        info = await self.bus.js.stream_info(self.subjects.stream(stream_kind))
        return int(info.state.messages)

    async def close(self) -> None:
        """Stop every service the way an operator does: a Control stop on the bus."""
        stop = events.Control(run_id=self.run_id, policy_version=0, command="stop", reason="test")
        await self.bus.nc.publish(self.subjects.control("stop"), events.encode(stop))
        await self.bus.nc.flush()
        try:
            if self.services:
                done, pending = await asyncio.wait(self.services, timeout=30)
                assert not pending, "a service did not stop within 30 s of a Control stop"
                for task in done:
                    task.result()
        finally:
            await self.bus.nc.close()
            await self.store.redis.aclose()


def _config(nats: embedded.Server, redis: embedded.Server, *overrides: str) -> MilesConfig:
    return load_config(
        overrides=[
            f'infra.nats_url="{nats.url}"',
            f'infra.redis_url="{redis.url}"',
            "coordinator.heartbeat_seconds=0.2",
            "rollout.group_size=2",
            *overrides,
        ]
    )


def _recipe(directory: Path) -> Recipe:
    path = directory / "recipe.py"
    path.write_text(RECIPE)
    return load_recipe(path)


@pytest.fixture
def run_config(nats_server: embedded.Server, redis_server: embedded.Server) -> MilesConfig:
    return _config(nats_server, redis_server, "buffer.groups_per_batch=2")


@pytest.fixture
async def harness(run_config: MilesConfig, tmp_path: Path) -> AsyncIterator[Harness]:
    harness = await Harness.open(run_config, _recipe(tmp_path), tmp_path)
    yield harness
    await harness.close()


def _sample(
    task_id: str,
    index: int,
    label: str = "3",
    text: str = "3",
    reward: float = 0.0,
    version: int = 0,
) -> events.Sample:
    return events.Sample(
        sample_id=f"{task_id}/{index}",
        prompt="1+2=",
        label=label,
        prompt_ids=[3, 12, 4, 13],
        response_ids=[5, 1],
        response_logprobs=[-0.5, -0.1],
        response_text=text,
        finish_reason="stop",
        policy_version_first=version,
        policy_version_last=version,
        reward=reward,
    )


def _generated(
    h: Harness, task_id: str, samples: list[events.Sample], split: events.Split = "train"
) -> events.GeneratedGroup:
    return events.GeneratedGroup(
        run_id=h.run_id,
        policy_version=0,
        task_id=task_id,
        split=split,
        eval_round=0 if split == "eval" else -1,
        samples=samples,
    )


def _scored(h: Harness, task_id: str, rewards: list[float], version: int = 0) -> events.ScoredGroup:
    return events.ScoredGroup(
        run_id=h.run_id,
        policy_version=version,
        task_id=task_id,
        split="train",
        eval_round=-1,
        samples=[_sample(task_id, i, reward=r, version=version) for i, r in enumerate(rewards)],
    )


# --- reward -------------------------------------------------------------------------------------


async def test_reward_scores_train_and_eval_groups(harness: Harness) -> None:
    h = harness
    h.start("reward", reward_main)
    train = _generated(h, "t0", [_sample("t0", 0, text="3"), _sample("t0", 1, text="4")])
    held_out = _generated(h, "eval0-0", [_sample("eval0-0", 0, label="7", text="7")], "eval")
    await h.publish(h.subjects.generated, train)
    await h.publish(h.subjects.generated, held_out)

    [scored] = await h.collect(await h.bus.pull("scored", BUFFER_CONSUMER), events.ScoredGroup, 1)
    assert (scored.task_id, scored.split, scored.policy_version) == ("t0", "train", 0)
    assert [(s.reward, s.failed) for s in scored.samples] == [(1.0, False), (0.0, False)]

    ledger = await h.bus.pull("ledger", COORDINATOR_CONSUMER)
    [evaluated] = await h.collect(ledger, events.ScoredGroup, 1)
    assert (evaluated.task_id, evaluated.split, evaluated.eval_round) == ("eval0-0", "eval", 0)
    assert evaluated.samples[0].reward == 1.0
    await h.wait_for(lambda: _settled(h, "generated", REWARD_CONSUMER))


async def test_reward_failures_mark_samples_and_the_service_goes_on(harness: Harness) -> None:
    h = harness
    h.start("reward", reward_main)
    samples = [
        _sample("t0", 0, label="raise"),
        _sample("t0", 1, label="nan"),
        _sample("t0", 2, label="3", text="3"),
    ]
    await h.publish(h.subjects.generated, _generated(h, "t0", samples))
    await h.publish(h.subjects.generated, _generated(h, "t1", [_sample("t1", 0, text="3")]))

    scored = await h.bus.pull("scored", BUFFER_CONSUMER)
    first, second = await h.collect(scored, events.ScoredGroup, 2)
    raised, nan, fine = first.samples
    assert raised.failed and "RuntimeError: reward exploded" in raised.error
    assert nan.failed and "nan" in nan.error and nan.reward == 0.0
    assert (fine.failed, fine.reward, fine.error) == (False, 1.0, "")
    assert second.task_id == "t1" and second.samples[0].reward == 1.0
    h.check_alive()


async def test_oversized_output_is_dead_lettered_counted_and_its_input_acked(
    nats_server: embedded.Server, redis_server: embedded.Server, tmp_path: Path
) -> None:
    config = _config(nats_server, redis_server, "infra.max_payload_bytes=2048")
    h = await Harness.open(config, _recipe(tmp_path), tmp_path)
    try:
        h.start("reward", reward_main)
        verbose = [_sample("t0", i, label="verbose") for i in range(4)]  # errors make it big
        await h.publish(h.subjects.generated, _generated(h, "t0", verbose))
        await h.publish(h.subjects.generated, _generated(h, "t1", [_sample("t1", 0)]))
        [scored] = await h.collect(
            await h.bus.pull("scored", BUFFER_CONSUMER), events.ScoredGroup, 1
        )
        assert scored.task_id == "t1"  # the service went on
        await h.wait_for(lambda: _settled(h, "generated", REWARD_CONSUMER))
        assert await h.store.dead_letters() == {"oversized": 1}
        assert await h.store.filtered() == {"oversized": 1}  # the coordinator replaces it
        assert await h.stored("dead") == 1
    finally:
        await h.close()


# --- buffer -------------------------------------------------------------------------------------


async def _settled(h: Harness, stream_kind: str, durable: str) -> bool:
    info = await h.consumer(stream_kind, durable)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def test_buffer_batches_groups_and_acks_after_publishing(harness: Harness) -> None:
    h = harness
    h.start("buffer", buffer_main)
    await h.publish(h.subjects.scored, _scored(h, "a", [1, 0]))

    async def held() -> bool:
        info = await h.consumer("scored", BUFFER_CONSUMER)
        return info.num_pending == 0 and info.num_ack_pending == 1

    await h.wait_for(held)  # delivered to the buffer, which holds it unacked: half a batch
    assert await h.stored("batches") == 0

    await h.publish(h.subjects.scored, _scored(h, "b", [3, 0, 0]))
    [batch] = await h.collect(await h.bus.pull("batches", TRAINER_CONSUMER), events.Batch, 1)
    await h.wait_for(lambda: _settled(h, "scored", BUFFER_CONSUMER))  # acked once batched
    assert batch.task_ids == ["a", "b"]
    # a: [1, 0] -> ±0.5 / 0.5; b: [3, 0, 0] -> mean 1, std sqrt(2): [2, -1, -1] / sqrt(2)
    root2 = 2**0.5
    assert [s.advantage for s in batch.samples] == pytest.approx(
        [1, -1, 2 / root2, -1 / root2, -1 / root2], rel=1e-5
    )
    assert [s.sample_id for s in batch.samples] == ["a/0", "a/1", "b/0", "b/1", "b/2"]


async def test_a_batch_over_the_inline_size_goes_through_the_blob_store(
    nats_server: embedded.Server, redis_server: embedded.Server, tmp_path: Path
) -> None:
    config = _config(
        nats_server, redis_server, "buffer.groups_per_batch=2", "buffer.inline_batch_bytes=0"
    )
    h = await Harness.open(config, _recipe(tmp_path), tmp_path)
    try:
        h.start("buffer", buffer_main)
        await h.publish(h.subjects.scored, _scored(h, "a", [1, 0]))
        await h.publish(h.subjects.scored, _scored(h, "b", [3, 0, 0]))
        [batch] = await h.collect(await h.bus.pull("batches", TRAINER_CONSUMER), events.Batch, 1)
        assert batch.samples == [] and batch.samples_uri.startswith("file://")
        full = await batches.resolved(batch, DirBlobStore(tmp_path / "blobs"))
        assert [s.sample_id for s in full.samples] == ["a/0", "a/1", "b/0", "b/1", "b/2"]
    finally:
        await h.close()


async def test_buffer_filters_zero_variance_and_rejects_bad_groups(harness: Harness) -> None:
    h = harness
    h.start("buffer", buffer_main)
    await h.publish(h.subjects.scored, _scored(h, "flat", [1, 1]))
    await h.publish(h.subjects.scored, _scored(h, "ahead", [1, 0], version=5))  # run is at v0
    await h.publish(h.subjects.scored, _scored(h, "nan", [1, math.nan]))  # not marked failed
    await h.publish(h.subjects.scored, _scored(h, "inf", [math.inf, 0]))

    ledger = await h.bus.pull("ledger", COORDINATOR_CONSUMER)
    notices = await h.collect(ledger, events.GroupFiltered, 4)
    assert {n.task_id: n.reason for n in notices} == {
        "flat": "zero_variance",
        "ahead": "future_version",
        "nan": "non_finite_reward",
        "inf": "non_finite_reward",
    }
    await h.wait_for(lambda: _settled(h, "scored", BUFFER_CONSUMER))
    assert await h.store.filtered() == {
        "zero_variance": 1,
        "future_version": 1,
        "non_finite_reward": 2,
    }
    # A filtered group is a normal outcome; a bad one is also dead-lettered for an operator.
    assert await h.store.dead_letters() == {"future_version": 1, "non_finite_reward": 2}
    assert await h.stored("dead") == 3
    assert await h.stored("batches") == 0
    h.check_alive()


async def test_a_restarted_buffer_publishes_its_planned_batch_unchanged(
    harness: Harness,
) -> None:
    """Batches planned before a crash are rebuilt as planned, not regrouped; groups of a batch
    that was published already are acked, never batched twice."""
    h = harness
    await h.store.plan_batch("b-planned", ["a", "c"])  # planned, then the buffer died
    await h.store.plan_batch("b-done", ["d", "e"])
    await h.store.mark_published("b-done", ["d", "e"])
    for task_id in ("a", "b", "c", "d"):
        await h.publish(h.subjects.scored, _scored(h, task_id, [1, 0]))
    h.start("buffer", buffer_main)

    batches = await h.bus.pull("batches", TRAINER_CONSUMER)
    [batch] = await h.collect(batches, events.Batch, 1)
    assert batch.task_ids == ["a", "c"]  # dispatch order alone would have picked a and b
    await h.nothing_more(batches, 1.0)  # b waits for a partner; d is in a published batch

    async def only_b_held() -> bool:
        info = await h.consumer("scored", BUFFER_CONSUMER)
        return info.num_pending == 0 and info.num_ack_pending == 1

    await h.wait_for(only_b_held)


# --- coordinator --------------------------------------------------------------------------------


def _jsonl(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "label": lab}) + "\n" for p, lab in rows))
    return path


async def test_coordinator_paces_dispatch_by_staleness_gate(
    nats_server: embedded.Server, redis_server: embedded.Server, tmp_path: Path
) -> None:
    train = _jsonl(tmp_path / "train.jsonl", [(f"{i}+1=", str(i + 1)) for i in range(6)])
    held_out = _jsonl(tmp_path / "eval.jsonl", [("2+2=", "4"), ("3+3=", "6")])
    config = _config(
        nats_server,
        redis_server,
        f'data.train_path="{train}"',
        f'data.eval_path="{held_out}"',
        "data.shuffle=false",  # the file's order, so the test can name each task's prompt
        "buffer.groups_per_batch=2",
        "buffer.max_staleness=0",
        "run.steps=3",
        "coordinator.eval_every=100",
        "rollout.group_size=4",
    )
    h = await Harness.open(config, _recipe(tmp_path), tmp_path)
    try:
        h.start("coordinator", coordinator_main)
        tasks = await h.bus.pull("tasks", ROLLOUT_CONSUMER)

        first = await h.collect(tasks, events.Task, 4)
        await h.nothing_more(tasks, 1.0)  # the gate: (0 + 0 + 1) * 2 train groups at version 0
        evals = [t for t in first if t.split == "eval"]
        assert [(t.prompt, t.greedy, t.eval_round, t.group_size) for t in evals] == [
            ("2+2=", True, 0, 1),
            ("3+3=", True, 0, 1),
        ]
        assert [t.task_id.split("-")[:2] for t in evals] == [["eval0", "0"], ["eval0", "1"]]
        trains = [t for t in first if t.split == "train"]
        assert [(t.task_id, t.prompt, t.policy_version, t.group_size) for t in trains] == [
            ("t0", "0+1=", 0, 4),
            ("t1", "1+1=", 0, 4),
        ]

        step = events.StepCommitted(
            run_id=h.run_id,
            policy_version=1,
            step=1,
            batch_id="b-1",
            task_ids=["t0", "t1"],
            sample_ids=[f"t{i}/{j}" for i in range(2) for j in range(4)],
            reward_mean=0.5,
            loss=0.1,
            grad_norm=1.0,
            kl=0.0,
        )
        # The trainer's commit moves the counters in Redis; its event wakes the coordinator.
        await Manifests(h.store.redis, h.run_id).commit(_manifest(h.run_id, step))
        await h.publish(h.subjects.steps, step, "step/1")
        second = await h.collect(tasks, events.Task, 2)
        await h.nothing_more(tasks, 1.0)
        assert [(t.task_id, t.policy_version) for t in second] == [("t2", 1), ("t3", 1)]

        filtered = events.GroupFiltered(
            run_id=h.run_id, policy_version=1, task_id="t2", reason="zero_variance"
        )
        await h.store.record_filtered("t2", "zero_variance")  # the buffer's record, then notice
        await h.publish(h.subjects.filtered, filtered, "filtered/t2")
        [replacement] = await h.collect(tasks, events.Task, 1)
        await h.nothing_more(tasks, 1.0)
        assert (replacement.task_id, replacement.prompt) == ("t4", "4+1=")

        run = await h.store.run()
        assert (run["cursor"], run["trained_groups"]) == ("5", "2")
        assert await h.store.filtered_groups() == 1
    finally:
        await h.close()


async def test_a_stop_control_event_marks_the_run_stopped_and_a_resume_running(
    nats_server: embedded.Server, redis_server: embedded.Server, tmp_path: Path
) -> None:
    """Every service exits 0 on a stop control event, so the run record is where `miles run`
    reads that the run was stopped, and why; a restarted coordinator (a resume) runs it again."""
    train = _jsonl(tmp_path / "train.jsonl", [(f"{i}+1=", str(i + 1)) for i in range(6)])
    held_out = _jsonl(tmp_path / "eval.jsonl", [("2+2=", "4")])
    config = _config(
        nats_server,
        redis_server,
        f'data.train_path="{train}"',
        f'data.eval_path="{held_out}"',
        "run.steps=3",
        "coordinator.eval_every=100",
    )
    first = await Harness.open(config, _recipe(tmp_path), tmp_path)
    first.start("coordinator", coordinator_main)
    await first.collect(await first.bus.pull("tasks", ROLLOUT_CONSUMER), events.Task, 2)
    await first.close()  # a stop control event, reason "test"

    store = RunStore(await connect_redis(redis_server.url, 5), first.run_id)
    record = RunRecord.decode(await store.run())
    assert (record.status, record.stop_reason) == ("stopped", "test")
    nc = await connect_nats(nats_server.url, 5, name="test")
    bus = NatsBus(nc, first.run_id, "test", config.infra.max_payload_bytes)
    resumed = Harness(config, _recipe(tmp_path), tmp_path, bus, store)
    resumed.start("coordinator", coordinator_main)

    async def running() -> bool:
        again = RunRecord.decode(await store.run())
        return (again.status, again.stop_reason) == ("running", "")

    try:
        await resumed.wait_for(running)
    finally:
        await resumed.close()


async def test_an_evaluation_missing_results_is_recorded_partial_not_awaited_forever(
    nats_server: embedded.Server, redis_server: embedded.Server, tmp_path: Path
) -> None:
    train = _jsonl(tmp_path / "train.jsonl", [("1+1=", "2")])
    held_out = _jsonl(tmp_path / "eval.jsonl", [("2+2=", "4"), ("3+3=", "6")])
    config = _config(
        nats_server,
        redis_server,
        f'data.train_path="{train}"',
        f'data.eval_path="{held_out}"',
        "coordinator.eval_timeout_seconds=1.0",
    )
    h = await Harness.open(config, _recipe(tmp_path), tmp_path)
    try:
        h.start("coordinator", coordinator_main)
        tasks = await h.bus.pull("tasks", ROLLOUT_CONSUMER)
        evals = [t for t in await h.collect(tasks, events.Task, 3) if t.split == "eval"]
        answered = events.ScoredGroup(  # one of two results comes back; the other is lost
            run_id=h.run_id,
            policy_version=0,
            task_id=evals[0].task_id,
            split="eval",
            eval_round=0,
            samples=[_sample(evals[0].task_id, 0, label="4", text="4", reward=1.0)],
        )
        await h.publish(h.subjects.eval_scored, answered)

        async def recorded() -> bool:
            return bool(await h.store.evals())

        await h.wait_for(recorded, timeout=15)
        [row] = await h.store.evals()
        assert (row.round, row.n, row.expected, row.accuracy) == (0, 1, 2, 1.0)
    finally:
        await h.close()


def _manifest(run_id: str, step: events.StepCommitted) -> Manifest:
    return Manifest(
        run_id=run_id,
        step=step.step,
        policy_version=step.step,
        weights_uri="file:///nowhere",
        weights_sha256="0" * 64,
        state_uri=None,
        state_sha256=None,
        state_step=0,
        batch_ids=[step.batch_id],
        task_ids=step.task_ids,
        sample_ids=step.sample_ids,
        dataset_cursor=0,
        rng_state="",
        config_hash="",
        samples=len(step.sample_ids),
        min_sample_version=0,
        reward_mean=step.reward_mean,
        metrics={"loss": step.loss},
        seconds={},
    )


# --- rollout and trainer on Ray -----------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def on_ray(
    nats_server: embedded.Server,
    redis_server: embedded.Server,
    ray_cluster: str,
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Harness]:
    """One run with a rollout and a trainer service, started once: Ray actors are slow to make."""
    run_dir = tmp_path_factory.mktemp("ray-run")
    config = _config(
        nats_server,
        redis_server,
        f'model.path="{tiny_model}"',
        f'infra.ray_address="{ray_cluster}"',
        "rollout.group_size=4",
        "rollout.max_new_tokens=4",
        "rollout.engine_threads=1",
        "trainer.threads=1",
    )
    h = await Harness.open(config, _recipe(run_dir), run_dir)
    h.start("rollout", rollout_main)
    h.start("trainer", trainer_main)
    yield h
    await h.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_rollout_turns_a_task_into_a_group(on_ray: Harness) -> None:
    h = on_ray
    task = events.Task(
        run_id=h.run_id,
        policy_version=0,
        task_id="r0",
        prompt="12+34=",
        label="64",
        group_size=4,
        seed=1,
    )
    await h.publish(h.subjects.tasks, task, "r0")
    generated = await h.bus.pull("generated", REWARD_CONSUMER)
    [group] = await h.collect(generated, events.GeneratedGroup, 1, timeout=60)

    assert (group.task_id, group.split, group.policy_version) == ("r0", "train", 0)
    assert [s.sample_id for s in group.samples] == ["r0/0", "r0/1", "r0/2", "r0/3"]
    for sample in group.samples:
        assert sample.prompt_ids == [3, 4, 12, 5, 6, 13]  # "12+34=": one id per character
        assert 1 <= len(sample.response_ids) <= 4
        assert len(sample.response_logprobs) == len(sample.response_ids)
        assert all(-50 < logprob <= 0 for logprob in sample.response_logprobs)
        assert sample.policy_version_first == 0
        assert (sample.label, sample.failed) == ("64", False)
    await h.wait_for(lambda: _settled(h, "tasks", ROLLOUT_CONSUMER))


def _batch(h: Harness) -> events.Batch:
    prompt = [3, 4, 12, 5, 6, 13]  # "12+34="
    samples = [
        events.TrainSample(
            sample_id=f"x{i // 2}/{i % 2}",
            prompt_ids=prompt,
            response_ids=response,
            response_logprobs=[-2.5] * len(response),
            advantage=advantage,
            reward=float(advantage > 0),
            policy_version=0,
        )
        for i, (response, advantage) in enumerate(
            [([8, 11, 1], 1.0), ([9, 2, 1], -1.0), ([7, 1], 1.0), ([3, 3, 3], -1.0)]
        )
    ]
    return events.Batch(
        run_id=h.run_id,
        policy_version=0,
        batch_id="b-test",
        task_ids=["x0", "x1"],
        samples=samples,
    )


@pytest.mark.asyncio(loop_scope="module")
async def test_trainer_commits_a_step_once(on_ray: Harness) -> None:
    h = on_ray
    batch = _batch(h)
    await h.publish(h.subjects.batches, batch, batch.batch_id)
    ledger = await h.bus.pull("ledger", COORDINATOR_CONSUMER)
    [step] = await h.collect(ledger, events.StepCommitted, 1, timeout=60)
    assert (step.step, step.policy_version, step.batch_id) == (1, 1, "b-test")
    assert step.task_ids == ["x0", "x1"]
    assert step.sample_ids == ["x0/0", "x0/1", "x1/0", "x1/1"]
    assert step.reward_mean == 0.5

    last = await h.bus.js.get_last_msg(h.subjects.stream("weights"), h.subjects.weights)
    assert last.data is not None
    weights = events.decode(last.data, events.WeightsPublished, h.run_id)
    assert (weights.step, weights.policy_version) == (1, 1)
    assert sha256_file(Path(urlparse(weights.uri).path) / WEIGHTS_FILE) == weights.sha256

    [manifest] = await Manifests(h.store.redis, h.run_id).all()
    assert (manifest.step, manifest.batch_ids, manifest.weights_sha256) == (
        1,
        ["b-test"],
        weights.sha256,
    )
    assert manifest.state_step == 1 and manifest.state_uri  # checkpoint_every = 1
    assert await h.store.policy_version() == 1

    # A redelivery (a new message id, so JetStream's dedupe cannot catch it): the ledger does.
    await h.publish(h.subjects.batches, batch, "b-test-redelivered")
    await h.wait_for(lambda: _settled(h, "batches", TRAINER_CONSUMER))
    assert await h.stored("batches") == 0  # consumed (acked) from the work queue
    assert await Manifests(h.store.redis, h.run_id).latest_step() == 1
    assert await h.store.policy_version() == 1
    assert await h.stored("weights") == 1  # the re-announcement was deduped
    await h.nothing_more(ledger, 0.5)


# --- offline DPO: coordinator, buffer and trainer, no rollout or reward service ------------------


async def test_dpo_trains_on_pairs_without_rollout_or_reward(
    nats_server: embedded.Server,
    redis_server: embedded.Server,
    ray_cluster: str,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(8)]
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    held_out = _jsonl(tmp_path / "eval.jsonl", [("2+2=", "4")])
    config = _config(
        nats_server,
        redis_server,
        "algorithm.name='dpo'",
        f'model.path="{tiny_model}"',
        f'infra.ray_address="{ray_cluster}"',
        f'data.train_path="{pairs}"',
        f'data.eval_path="{held_out}"',
        "buffer.groups_per_batch=2",
        "run.steps=2",
        "coordinator.eval_every=100",
        "coordinator.eval_timeout_seconds=1.0",  # nobody generates: the rounds end partial
        "trainer.threads=1",
    )
    h = await Harness.open(config, _recipe(tmp_path), tmp_path)
    try:
        h.start("coordinator", coordinator_main)
        h.start("buffer", buffer_main)
        h.start("trainer", trainer_main)
        manifests = Manifests(h.store.redis, h.run_id)

        async def two_steps() -> bool:
            return await manifests.latest_step() == 2

        await h.wait_for(two_steps, timeout=120)
        first, second = await manifests.all()
        assert first.sample_ids == ["t0/chosen", "t0/rejected", "t1/chosen", "t1/rejected"]
        assert second.task_ids == ["t2", "t3"]
        assert first.metrics["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference
        assert first.reward_mean == 0.5
        assert second.metrics["dpo_margin"] != 0.0  # the first update moved the policy
        tasks = await h.bus.pull("tasks", ROLLOUT_CONSUMER)
        dispatched = [task for task, _ in await h.bus.fetch(tasks, events.Task, 10, 1.0)]
        assert dispatched and all(task.split == "eval" for task in dispatched)  # no train task
    finally:
        await h.close()

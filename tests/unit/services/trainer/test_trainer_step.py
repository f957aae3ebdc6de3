"""One batch through the trainer over the in-memory bus and run record, with a fake actor: the
order of the sequence the fault tolerance rests on (weights, state, commit, push, announce,
ack), where the fault points fire in it, and a redelivered batch the ledger knows."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from miles import events
from miles.config import MilesConfig, load_config
from miles.recipe import Recipe
from miles.runtime import faults
from miles.runtime.bus import MemoryBroker, MemoryBus, Message
from miles.runtime.memory_store import MemoryManifests, MemoryRun, MemoryRunStore
from miles.runtime.service import ServiceContext
from miles.runtime.subjects import COORDINATOR_CONSUMER, TRAINER_CONSUMER
from miles.telemetry import Metrics
from miles.trainer import StepMetrics
from miles.weights.blobs import DirBlobStore
from services.trainer.position import FullState, ResumeState
from services.trainer.step import handle

RUN = "run"


class Method:
    """An actor method as Ray exposes it (``.remote(*args)``, awaited), journaled."""

    def __init__(self, journal: list[str], name: str, body: Callable[..., Any]) -> None:
        self.journal, self.name, self.body = journal, name, body

    def remote(self, *args: Any) -> Awaitable[Any]:
        self.journal.append(f"actor.{self.name}")

        async def answer() -> Any:
            return self.body(*args)

        return answer()


def write(directory: str, name: str, content: bytes) -> str:
    Path(directory).mkdir(parents=True)
    (Path(directory) / name).write_bytes(content)
    return hashlib.sha256(content).hexdigest()


class Actor:
    def __init__(self, journal: list[str]) -> None:
        metrics = StepMetrics.from_mapping({"loss": 0.5, "grad_norm": 1.0, "kl": 0.0})
        self.train_step = Method(journal, "train_step", lambda samples, at: metrics)
        self.save_weights = Method(
            journal, "save_weights", lambda d, at: write(d, "model.safetensors", b"w%d" % at)
        )
        self.save_state = Method(
            journal, "save_state", lambda d, at: write(d, "trainer_state.pt", b"s%d" % at)
        )
        self.rng_state = Method(journal, "rng_state", lambda at: f"rng{at}")
        self.push_weights = Method(journal, "push_weights", lambda urls, at: urls)


def journaled(journal: list[str], name: str, call: Callable[..., Awaitable[Any]]) -> Any:
    async def recorded(*args: Any, **kwargs: Any) -> Any:
        journal.append(name)
        return await call(*args, **kwargs)

    return recorded


class JournaledMessage:
    """A pulled message whose acks and naks go into the journal too."""

    def __init__(self, msg: Message, journal: list[str]) -> None:
        self.msg, self.journal = msg, journal
        self.subject, self.data, self.headers = msg.subject, msg.data, msg.headers
        self.metadata = msg.metadata

    async def ack(self) -> None:
        self.journal.append("ack")
        await self.msg.ack()

    async def nak(self, delay: float | None = None) -> None:
        self.journal.append("nak")
        await self.msg.nak(delay)

    async def in_progress(self) -> None:
        await self.msg.in_progress()


async def parts(
    tmp_path: Path, config: MilesConfig, journal: list[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[ServiceContext, DirBlobStore, Any, JournaledMessage, events.Batch]:
    """A trainer's context over the twins, a batch pulled from the bus, and the journal wired
    to every step that matters: the actor, the blob store, the commit, publishes, ack/nak and
    the fault points."""
    bus = MemoryBus(MemoryBroker(), RUN, "trainer")
    await bus.ensure_topology()
    run = MemoryRun(RUN)
    store = MemoryRunStore(run)
    await store.create_run("hash", "{}")
    await store.update(cursor=7)
    await store.register_engines({"e0": "http://e0"})
    recipe = Recipe(path=tmp_path / "recipe.py", config=config, rewards={})
    metrics = Metrics("trainer", RUN)
    manifests = MemoryManifests(run)
    ctx = ServiceContext("trainer", config, recipe, RUN, tmp_path, bus, store, manifests, metrics)
    ctx.manifests.commit = journaled(journal, "commit", ctx.manifests.commit)
    bus.publish = journaled(journal, "publish", bus.publish)
    blobs = DirBlobStore(tmp_path / "blobs")
    blobs.put_dir = journaled(journal, "blobs.put_dir", blobs.put_dir)
    monkeypatch.setattr(faults, "crash_point", lambda point: journal.append(f"fault {point}"))

    sample = events.TrainSample(
        sample_id="t0/0",
        prompt_ids=[1],
        response_ids=[2],
        response_logprobs=[-0.5],
        advantage=1.0,
        reward=1.0,
        policy_version=0,
    )
    batch = events.Batch(
        run_id=RUN, policy_version=0, batch_id="b1", task_ids=["t0"], samples=[sample]
    )
    await bus.publish(bus.subjects.batches, batch, "b1")
    [(got, msg)] = await bus.fetch(await bus.pull("batches", TRAINER_CONSUMER), events.Batch, 1, 1)
    journal.clear()
    return ctx, blobs, Actor(journal), JournaledMessage(msg, journal), got


async def announced(ctx: ServiceContext) -> list[events.StepCommitted]:
    ledger = await ctx.bus.pull("ledger", COORDINATOR_CONSUMER)
    return [step for step, _ in await ctx.bus.fetch(ledger, events.StepCommitted, 10, 0.01)]


async def test_a_batch_is_trained_written_committed_pushed_announced_then_acked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal: list[str] = []
    config = load_config(overrides=["trainer.checkpoint_every=1", "rollout.weight_sync=tensor"])
    ctx, blobs, actor, msg, batch = await parts(tmp_path, config, journal, monkeypatch)

    manifest = await handle(ctx, actor, blobs, batch, msg, ResumeState(), 0.0)

    assert journal == [
        "actor.train_step",
        "fault trainer.stepped",  # after the optimizer step, before anything is written
        "actor.save_weights",
        "blobs.put_dir",
        "actor.save_state",  # a full state is due every step (checkpoint_every = 1)
        "blobs.put_dir",
        "actor.rng_state",
        "commit",
        "fault trainer.committed",  # after the commit, before anything is announced
        "actor.push_weights",
        "publish",  # weights
        "publish",  # step
        "ack",  # last: a crash anywhere before it redelivers the batch
    ]
    assert manifest is not None and await ctx.manifests.latest() == manifest
    assert (manifest.step, manifest.state_step, manifest.dataset_cursor) == (1, 1, 7)
    assert manifest.metrics == {"loss": 0.5, "kl": 0.0, "grad_norm": 1.0}
    assert manifest.rng_state == "rng1"
    assert [(s.step, s.batch_id) for s in await announced(ctx)] == [(1, "b1")]


async def test_between_full_states_a_step_writes_weights_only_and_carries_the_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal: list[str] = []
    config = load_config(overrides=["trainer.checkpoint_every=2"])  # blob sync: no push
    ctx, blobs, actor, msg, batch = await parts(tmp_path, config, journal, monkeypatch)
    old = FullState("file:///blobs/state/s0-x", "0" * 64, 0)

    manifest = await handle(ctx, actor, blobs, batch, msg, ResumeState(0, old), 0.0)

    assert "actor.save_state" not in journal and "actor.push_weights" not in journal
    assert manifest is not None and manifest.step == 1
    assert (manifest.state_uri, manifest.state_step) == (old.uri, 0)


async def test_a_batch_the_ledger_knows_is_announced_again_and_acked_not_trained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal: list[str] = []
    config = load_config(overrides=["trainer.checkpoint_every=1"])
    ctx, blobs, actor, msg, batch = await parts(tmp_path, config, journal, monkeypatch)
    committed = await handle(ctx, actor, blobs, batch, msg, ResumeState(), 0.0)
    journal.clear()

    # The same batch again, as JetStream redelivers it after a crash past the commit.
    again = await handle(ctx, actor, blobs, batch, msg, ResumeState(), 0.0)

    assert again is None
    assert journal == ["publish", "publish", "ack"]  # no actor call, no commit
    assert committed is not None
    assert [s.step for s in await announced(ctx)] == [1]  # the repeat was deduped by its id

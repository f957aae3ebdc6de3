"""Jepsen-style accounting of one finished run, read back from JetStream and Redis.

- attempted:    training tasks the coordinator tried to dispatch (its cursor: t0 .. t<cursor-1>)
- acknowledged: training tasks JetStream stored and acked (the tasks stream keeps them all)
- accounted:    tasks whose group was trained in a committed step, filtered by the buffer with
                a recorded reason, or dead-lettered
- lost = acknowledged - accounted; unexpected = accounted - attempted
- undecodable:  messages kept in the streams that are not events of this run (junk a fault
                injection published, a forged type): skipped and counted, by stream and reason
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

import msgspec
import nats
from redis.asyncio import Redis

from miles import events
from miles.events import E
from miles.runtime.bus import DeadLetter
from miles.runtime.checkpoint import Manifest, Manifests
from miles.runtime.store import RunStore
from miles.runtime.subjects import Subjects


@dataclass
class Audit:
    run: dict[str, str]
    manifests: list[Manifest]
    attempted: set[str]
    acknowledged: set[str]
    trained: set[str]
    filtered: set[str]
    dead: set[str]
    step_events: list[int]
    duplicate_samples: list[str] = field(default_factory=list)
    dispatched_twice: list[str] = field(default_factory=list)
    undecodable: Counter[str] = field(default_factory=Counter)
    """``<stream>: <reason>`` -> messages skipped there (the services dead-lettered them)."""

    @property
    def accounted(self) -> set[str]:
        return self.trained | self.filtered | self.dead

    @property
    def lost(self) -> set[str]:
        return self.acknowledged - self.accounted

    @property
    def unexpected(self) -> set[str]:
        return self.accounted - self.attempted

    def violations(self, steps: int, max_staleness: int) -> list[str]:
        """Every invariant the run broke, in words; empty when it held them all."""
        found = []
        if self.lost:
            found.append(f"lost {len(self.lost)} acknowledged tasks: {sorted(self.lost)[:10]}")
        if self.unexpected:
            found.append(f"unexpected tasks: {sorted(self.unexpected)[:10]}")
        if self.dispatched_twice:
            found.append(f"tasks stored twice: {self.dispatched_twice[:10]}")
        if self.duplicate_samples:
            found.append(f"samples in two steps: {self.duplicate_samples[:10]}")
        if self.trained & self.filtered:
            found.append(f"trained and filtered: {sorted(self.trained & self.filtered)[:10]}")
        versions = [m.policy_version for m in self.manifests]
        if [m.step for m in self.manifests] != list(range(1, len(self.manifests) + 1)):
            found.append(f"manifest steps not 1..n: {[m.step for m in self.manifests]}")
        if any(b <= a for a, b in itertools.pairwise(versions)):
            found.append(f"policy versions not strictly increasing: {versions}")
        if any(b <= a for a, b in zip(self.step_events, self.step_events[1:], strict=False)):
            found.append(f"step events not strictly increasing: {self.step_events}")
        for m in self.manifests:
            if m.min_sample_version < m.step - 1 - max_staleness:
                found.append(f"step {m.step} trained samples of version {m.min_sample_version}")
        if self.run.get("status") != "finished" or len(self.manifests) != steps:
            found.append(f"run {self.run.get('status')} with {len(self.manifests)}/{steps} steps")
        return found


async def audit(nats_url: str, redis: Redis, run_id: str) -> Audit:
    subjects = Subjects(run_id)
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        tasks = await _read_raw(js, subjects.stream("tasks"))
        ledger = await _read_raw(js, subjects.stream("ledger"))
        dead_letters = await _read_raw(js, subjects.stream("dead"))
    finally:
        await nc.close()
    undecodable: Counter[str] = Counter()
    dispatched = [
        task.task_id
        for task in decode_kept(tasks, events.Task, run_id, "tasks", undecodable)
        if task.split == "train"
    ]
    notices = decode_kept(ledger, events.Event, run_id, "ledger", undecodable)
    # chaos runs expect none; the detail says what it was
    dead = {letter.detail for letter in decode_dead(dead_letters, undecodable)}
    store = RunStore(redis, run_id)
    run = await store.run()
    manifests = await Manifests(redis, run_id).all()
    samples = Counter(s for m in manifests for s in m.sample_ids)
    return Audit(
        run=run,
        manifests=manifests,
        attempted={f"t{i}" for i in range(int(run.get("cursor", 0)) + 1)},
        acknowledged=set(dispatched),
        dispatched_twice=sorted(t for t, n in Counter(dispatched).items() if n > 1),
        trained={t for m in manifests for t in m.task_ids},
        filtered=set(await redis.hkeys(store.keys.filtered_tasks)),
        dead=dead,
        step_events=[e.step for e in notices if isinstance(e, events.StepCommitted)],
        duplicate_samples=sorted(s for s, n in samples.items() if n > 1),
        undecodable=undecodable,
    )


async def _read_raw(js: nats.js.JetStreamContext, stream: str) -> list[bytes]:
    info = await js.stream_info(stream)
    if info.state.messages == 0:
        return []
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await js.get_msg(stream, seq)
        except nats.js.errors.NotFoundError:
            continue
        out.append(msg.data or b"")
    return out


def decode_kept(
    payloads: list[bytes], expected: type[E], run_id: str, stream: str, skipped: Counter[str]
) -> list[E]:
    """The ``expected`` events of the run among ``payloads``. The rest (junk, pickles, another
    run's or another type's events) is counted in ``skipped`` by stream and reason, not raised:
    a stream keeps what a fault injection published, which the services dead-lettered."""
    kept = []
    for data in payloads:
        try:
            kept.append(events.decode(data, expected, run_id))
        except events.BadEvent as bad:
            skipped[f"{stream}: {bad.reason}"] += 1
    return kept


def decode_dead(payloads: list[bytes], skipped: Counter[str]) -> list[DeadLetter]:
    """The dead-letter records; junk published to the dead subject is counted, not raised."""
    letters = []
    for data in payloads:
        try:
            letters.append(msgspec.msgpack.decode(data, type=DeadLetter))
        except msgspec.DecodeError:  # ValidationError derives from it
            skipped["dead: not a dead letter"] += 1
    return letters

"""What the permissions table allows, read as the servers read it, and the subjects and keys of a
run the tests try: shared by tests/unit/runtime/test_permissions.py (the table says what the
issue asks) and tests/integration/test_permissions.py (the servers enforce the table)."""

from __future__ import annotations

from fnmatch import fnmatchcase

from miles.runtime.bus.broker import matches
from miles.runtime.permissions import Rights, blob_bucket
from miles.runtime.store import RUNS_KEY, RunKeys
from miles.runtime.subjects import (
    COORDINATOR_CONSUMER,
    ROLLOUT_CONSUMER,
    TRAINER_CONSUMER,
    Subjects,
)


def may_publish(rights: Rights, subject: str) -> bool:
    return any(matches(allowed, subject) for allowed in rights.nats.publish)


def may_subscribe(rights: Rights, subject: str) -> bool:
    """nats-server allows a subscription an allowed subject covers (``a.*.>`` under ``a.>``);
    the catalogue below has no case where ``matches`` and covering differ."""
    return any(matches(allowed, subject) for allowed in rights.nats.subscribe)


def may_write(rights: Rights, key: str) -> bool:
    return any(fnmatchcase(key, pattern) for pattern in rights.redis.write)


def may_read(rights: Rights, key: str) -> bool:
    patterns = (*rights.redis.write, *rights.redis.read)
    return any(fnmatchcase(key, pattern) for pattern in patterns)


def publish_subjects(run_id: str) -> list[str]:
    """What a compromised service would like to publish: every event subject of the run, the
    JetStream API calls that delete, purge or steal, and the Object Store."""
    s = Subjects(run_id)
    tasks, batches = s.stream("tasks"), s.stream("batches")
    bucket = blob_bucket(run_id)
    return [
        s.tasks,
        s.generated,
        s.scored,
        s.eval_scored,
        s.batches,
        s.weights,
        s.steps,
        s.filtered,
        s.engines,
        s.control("stop"),
        s.control("pause"),
        s.dead("trainer"),
        s.heartbeat("trainer", "host-1"),
        f"miles.other-run.{s.batches.split('.', 2)[2]}",
        f"$JS.API.STREAM.DELETE.{tasks}",
        f"$JS.API.STREAM.PURGE.{batches}",
        f"$JS.API.STREAM.CREATE.{batches}",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{tasks}.{ROLLOUT_CONSUMER}",
        f"$JS.API.CONSUMER.DELETE.{batches}.{TRAINER_CONSUMER}",
        f"$JS.API.CONSUMER.MSG.NEXT.{batches}.{TRAINER_CONSUMER}",
        f"$JS.API.CONSUMER.MSG.NEXT.{s.stream('ledger')}.{COORDINATOR_CONSUMER}",
        f"$JS.ACK.{batches}.{TRAINER_CONSUMER}.1.1.1.1.0",
        f"$JS.API.STREAM.PURGE.OBJ_{bucket}",
        f"$O.{bucket}.C.chunk",
    ]


def subscribe_subjects(run_id: str) -> list[str]:
    s = Subjects(run_id)
    return [s.batches, s.weights, s.control(), s.heartbeat("*", ">"), f"{s.root}.>", ">"]


def run_keys(run_id: str) -> list[str]:
    """Every key of a run's record, and one of another run's."""
    keys = RunKeys(run_id)
    return [
        keys.record,
        keys.config,
        keys.manifest(1),
        keys.latest,
        keys.trained,
        keys.batched,
        keys.batches,
        keys.evals,
        keys.services,
        keys.dead,
        keys.filtered,
        keys.filtered_tasks,
        keys.restarts,
        keys.stragglers,
        keys.engines,
        keys.collected,
        keys.leases,
        keys.lease("1:export-1"),
        RUNS_KEY,
        RunKeys("other-run").record,
        RunKeys("other-run").manifest(1),
    ]

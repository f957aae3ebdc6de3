"""Who may do what on the bus and in the run record: one table, for the embedded servers
(``embedded.py``) and for deploy/ (``deploy/generate.py`` writes its NATS and Redis configs).

Every service has its own NATS user and its own Redis ACL user, allowed only what its code does:

- NATS: publish the subjects it produces and the JetStream API calls it makes (pulling from its
  own durable consumer, acking, and for the coordinator creating the run's streams and
  consumers), subscribe its inbox replies and the broadcasts it listens to. A rollout cannot
  publish batches, weights or control.
- Redis: write the keys it owns, read the keys it reads, with only the commands it sends
  (scripts included: Redis checks each command a script runs). Only the trainer writes the
  manifests, ``latest`` and the ledger of trained batches. Redis lets ``EVALSHA`` touch only keys
  its user may read *and* write, so a script's declared keys are all in ``write``.

``operator`` is the identity of people and tools (`miles status`, `report`, `track`, `export`):
it reads every run's record, follows a run's subjects, reads its Object Store, sends control
commands and leases steps for an export. Nothing in the table may administer the servers; the
embedded servers add an ``admin`` (``embedded.py``), the launcher that started them.

Everything is scoped to one run id: key globs could not otherwise tell the run record
(``miles:run:<id>``) from its manifests (``miles:run:<id>:manifest:<n>``), and stream names hold
the run id inside a token, which NATS wildcards cannot match. deploy/ writes the placeholder
``{{MILES_RUN_ID}}`` that ``deploy/render.sh`` fills in when a server starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from miles.runtime.bus.topology import topology
from miles.runtime.service import SERVICES
from miles.runtime.store import RUNS_KEY, RunKeys
from miles.runtime.subjects import (
    BUFFER_CONSUMER,
    COORDINATOR_CONSUMER,
    REWARD_CONSUMER,
    ROLLOUT_CONSUMER,
    TRAINER_CONSUMER,
    Subjects,
)

OPERATOR = "operator"
IDENTITIES = (*SERVICES, OPERATOR)
"""Every identity of the table, in order: the five services, then the operator."""


@dataclass(frozen=True)
class NatsRights:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


@dataclass(frozen=True)
class RedisRights:
    commands: tuple[str, ...]
    """Redis commands (``command|subcommand`` for one subcommand), lower case."""
    write: tuple[str, ...]
    """Key patterns it may read and write."""
    read: tuple[str, ...]
    """Key patterns it may only read."""


@dataclass(frozen=True)
class Rights:
    identity: str
    nats: NatsRights
    redis: RedisRights


def blob_bucket(run_id: str) -> str:
    """The run's Object Store bucket (``miles.weights.follow.blob_bucket``, which this runtime
    layer may not import; a unit test holds the two equal)."""
    return f"miles_{run_id}_blobs"


def rights(run_id: str) -> dict[str, Rights]:
    """identity -> what it may do, for run ``run_id``."""
    s, keys = Subjects(run_id), RunKeys(run_id)
    bucket = blob_bucket(run_id)
    table = [
        Rights(
            "coordinator",
            _nats(
                publish=(
                    *_service(s, "coordinator"),
                    s.tasks,
                    s.scored,  # offline DPO: preference pairs go straight to the buffer
                    s.control(),
                    *_creates_topology(s),
                    *_pulls(s, "ledger", COORDINATOR_CONSUMER),
                ),
                subscribe=(*_listens(s), f"{s.root}.heartbeat.>"),
            ),
            RedisRights(
                commands=_commands(_SERVICE, "hsetnx set zadd hgetall rpush lrange hlen"),
                write=(*_service_keys(keys), keys.record, keys.config, keys.evals, RUNS_KEY),
                read=(keys.restarts, keys.filtered_tasks),
            ),
        ),
        Rights(
            "rollout",
            _nats(
                publish=(
                    *_service(s, "rollout"),
                    s.generated,
                    s.engines,
                    *_pulls(s, "tasks", ROLLOUT_CONSUMER),
                    *_follows(s.stream("weights")),
                    *_reads_objects(bucket),
                ),
                subscribe=_listens(s),
            ),
            RedisRights(
                commands=_commands(_SERVICE, _FILTER, "hdel"),
                write=(*_service_keys(keys), *_filter_keys(keys), keys.engines, keys.stragglers),
                read=(keys.record,),
            ),
        ),
        Rights(
            "reward",
            _nats(
                publish=(
                    *_service(s, "reward"),
                    s.scored,
                    s.eval_scored,
                    *_pulls(s, "generated", REWARD_CONSUMER),
                ),
                subscribe=_listens(s),
            ),
            RedisRights(
                commands=_commands(_SERVICE, _FILTER),
                write=(*_service_keys(keys), *_filter_keys(keys)),
                read=(keys.record,),
            ),
        ),
        Rights(
            "buffer",
            _nats(
                publish=(
                    *_service(s, "buffer"),
                    s.batches,
                    s.filtered,
                    *_pulls(s, "scored", BUFFER_CONSUMER),
                    # a batch too large for an event goes through the Object Store
                    # (buffer.inline_batch_bytes; the trainer deletes it once trained)
                    *_writes_objects(bucket),
                ),
                subscribe=_listens(s),
            ),
            RedisRights(
                commands=_commands(_SERVICE, _FILTER, "hmget multi exec"),
                write=(*_service_keys(keys), *_filter_keys(keys), keys.batches, keys.batched),
                read=(keys.record,),
            ),
        ),
        Rights(
            "trainer",
            _nats(
                publish=(
                    *_service(s, "trainer"),
                    s.weights,
                    s.steps,
                    *_pulls(s, "batches", TRAINER_CONSUMER),
                    *_writes_objects(bucket),
                ),
                subscribe=_listens(s),
            ),
            RedisRights(
                # get/mget/sismember: manifests and the ledger; the rest runs in its scripts
                # (commit, and the leases and collected steps of checkpoint GC).
                commands=_commands(
                    _SERVICE, _SCRIPTS, "get mget sismember hgetall set sadd srem smembers exists"
                ),
                write=(
                    *_service_keys(keys),
                    keys.record,
                    f"{keys.record}:manifest:*",
                    keys.latest,
                    keys.trained,
                    keys.leases,
                    keys.collected,
                ),
                read=(keys.engines, keys.lease("*")),
            ),
        ),
        Rights(
            OPERATOR,
            _nats(
                publish=(
                    s.control(),
                    "$JS.API.INFO",
                    "$JS.API.STREAM.LIST",
                    *_inspects_streams(s),
                    *_reads_objects(bucket),
                ),
                subscribe=("_INBOX.>", f"{s.root}.>"),
            ),
            RedisRights(
                # Reads what `miles status` / `report` / `track` show; an export leases the step
                # it reads (a script over leases and collected, so it writes both).
                commands=_commands(
                    "ping",
                    _SCRIPTS,
                    "get mget hget hgetall hmget hlen lrange zrange smembers sismember exists",
                    "set sadd srem del",
                ),
                write=(keys.leases, keys.lease("*"), keys.collected),
                read=("miles:*",),
            ),
        ),
    ]
    return {entry.identity: entry for entry in table}


# --- NATS ----------------------------------------------------------------------------------------


def _nats(publish: tuple[str, ...], subscribe: tuple[str, ...]) -> NatsRights:
    """Each subject once, in order (the Object Store and the weights both look up streams)."""
    return NatsRights(tuple(dict.fromkeys(publish)), tuple(dict.fromkeys(subscribe)))


def _service(s: Subjects, service: str) -> tuple[str, ...]:
    """What every service publishes: its heartbeats (the instance is ``host-pid``, and a host
    name may hold dots) and its dead letters (a JetStream publish)."""
    return (f"{s.root}.heartbeat.{service}.>", s.dead(service))


def _listens(s: Subjects) -> tuple[str, ...]:
    """Replies (JetStream acks, API answers, pulled messages) come to the client's inbox; every
    service listens for control commands."""
    return ("_INBOX.>", s.control())


def _pulls(s: Subjects, stream_kind: str, durable: str) -> tuple[str, ...]:
    """Binding to (and polling) a durable pull consumer, fetching from it and acking; acks,
    naks and ``in_progress`` all go to the message's ``$JS.ACK`` reply subject."""
    stream = s.stream(stream_kind)
    return (
        f"$JS.API.CONSUMER.INFO.{stream}.{durable}",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
        f"$JS.ACK.{stream}.{durable}.>",
    )


def _creates_topology(s: Subjects) -> tuple[str, ...]:
    """``NatsBus.ensure_topology``: each stream and durable consumer looked up, made if absent."""
    streams, consumers = topology(s)
    made: list[str] = []
    for spec in streams:
        name = s.stream(spec.kind)
        made += [f"$JS.API.STREAM.INFO.{name}", f"$JS.API.STREAM.CREATE.{name}"]
    for consumer in consumers:
        at = f"{s.stream(consumer.stream_kind)}.{consumer.durable}"
        # nats-py creates a durable-only consumer through the pre-2.9 API subject.
        made += [f"$JS.API.CONSUMER.INFO.{at}", f"$JS.API.CONSUMER.DURABLE.CREATE.{at}"]
    return tuple(made)


def _follows(stream: str) -> tuple[str, ...]:
    """An ordered consumer (nats-py's ``subscribe(ordered_consumer=True)``): the stream found by
    subject, an ephemeral push consumer made on it, and its flow-control replies."""
    return (
        "$JS.API.STREAM.NAMES",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.FC.{stream}.>",
    )


def _reads_objects(bucket: str) -> tuple[str, ...]:
    """Reading JetStream's Object Store: the bucket's stream, an object's metadata (the last
    message on its subject, or every object's for a listing) and its chunks, both through
    ordered consumers."""
    stream = f"OBJ_{bucket}"
    return (
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        *_follows(stream),
    )


def _writes_objects(bucket: str) -> tuple[str, ...]:
    """Also creating the bucket, putting chunks and metadata, and purging replaced or deleted
    objects' chunks (the trainer's checkpoint GC)."""
    stream = f"OBJ_{bucket}"
    return (
        *_reads_objects(bucket),
        f"$JS.API.STREAM.CREATE.{stream}",
        f"$JS.API.STREAM.PURGE.{stream}",
        f"$O.{bucket}.>",
    )


def _inspects_streams(s: Subjects) -> tuple[str, ...]:
    streams, _ = topology(s)
    names = [s.stream(spec.kind) for spec in streams]
    return tuple(
        subject
        for name in names
        for subject in (
            f"$JS.API.STREAM.INFO.{name}",
            f"$JS.API.CONSUMER.INFO.{name}.*",
            f"$JS.API.CONSUMER.LIST.{name}",
            f"$JS.API.CONSUMER.NAMES.{name}",
        )
    )


# --- Redis ---------------------------------------------------------------------------------------

_SERVICE = "ping hget hset hincrby"
"""What every service sends: the first contact, its run's status, its heartbeat and dead-letter
counts. Not ``CLIENT SETINFO``, which redis-py sends on connecting and shrugs off when refused
(Redis 7.0 does not know it, so an ACL file naming it would not load there)."""
_SCRIPTS = "evalsha script|load"
"""redis-py's ``register_script``: ``EVALSHA``, and ``SCRIPT LOAD`` when Redis lacks it."""
_FILTER = f"{_SCRIPTS} hsetnx"
"""``RunStore.record_filtered``: a script of ``HSETNX`` and ``HINCRBY``."""


def _commands(*groups: str) -> tuple[str, ...]:
    """Commands from space-separated groups, in order."""
    return tuple(command for group in groups for command in group.split())


def _service_keys(keys: RunKeys) -> tuple[str, ...]:
    return (keys.services, keys.dead)


def _filter_keys(keys: RunKeys) -> tuple[str, ...]:
    return (keys.filtered_tasks, keys.filtered)

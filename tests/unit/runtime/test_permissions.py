"""The permissions table says what the operations issue asks: each service publishes only what
it produces and writes only what it owns (only the trainer: manifests, latest, the ledger), and
the configs written from it (embedded, deploy/) say the same. The servers enforcing it is
tests/integration/test_permissions.py."""

from __future__ import annotations

import pytest
from access_checks import (
    may_publish,
    may_read,
    may_subscribe,
    may_write,
    publish_subjects,
    run_keys,
)

from miles.runtime import access
from miles.runtime.permissions import IDENTITIES, OPERATOR, blob_bucket, rights
from miles.runtime.service import SERVICES
from miles.runtime.store import RunKeys
from miles.runtime.subjects import Subjects
from miles.weights.follow import blob_bucket as weights_bucket

RUN = "r-1"
TABLE = rights(RUN)
S, KEYS = Subjects(RUN), RunKeys(RUN)


def published_by(identity: str) -> set[str]:
    return {subject for subject in publish_subjects(RUN) if may_publish(TABLE[identity], subject)}


def test_every_service_and_the_operator_has_an_entry() -> None:
    assert tuple(TABLE) == IDENTITIES == (*SERVICES, OPERATOR)
    assert blob_bucket(RUN) == weights_bucket(RUN)


def test_each_event_subject_has_exactly_its_producers() -> None:
    producers = {
        S.tasks: {"coordinator"},
        S.generated: {"rollout"},
        S.scored: {"reward", "coordinator"},  # the coordinator: offline DPO's pairs
        S.eval_scored: {"reward"},
        S.batches: {"buffer"},
        S.weights: {"trainer"},
        S.steps: {"trainer"},
        S.filtered: {"buffer"},
        S.engines: {"rollout"},
        S.control("stop"): {"coordinator", OPERATOR},
        S.dead("trainer"): {"trainer"},
        S.heartbeat("trainer", "host-1"): {"trainer"},
    }
    for subject, expected in producers.items():
        assert {i for i in IDENTITIES if may_publish(TABLE[i], subject)} == expected, subject


def test_a_rollout_cannot_publish_batches_weights_or_control() -> None:
    assert published_by("rollout") == {S.generated, S.engines}


def test_no_one_may_delete_purge_or_steal_from_a_stream() -> None:
    for identity in IDENTITIES:
        allowed = published_by(identity)
        assert not {s for s in allowed if ".DELETE." in s or "STREAM.PURGE.MILES" in s}, identity
        assert not {s for s in allowed if s.startswith("miles.other-run.")}, identity
    batches, ledger, bucket = S.stream("batches"), S.stream("ledger"), blob_bucket(RUN)
    only = {
        f"$JS.API.CONSUMER.MSG.NEXT.{batches}.trainer": {"trainer"},
        f"$JS.ACK.{batches}.trainer.1.1.1.1.0": {"trainer"},
        f"$JS.API.CONSUMER.MSG.NEXT.{ledger}.coordinator": {"coordinator"},
        # weights and state; the buffer's batches too large for an event
        f"$O.{bucket}.C.chunk": {"trainer", "buffer"},
        f"$JS.API.STREAM.PURGE.OBJ_{bucket}": {"trainer", "buffer"},  # replaced chunks
    }
    for subject, expected in only.items():
        assert {i for i in IDENTITIES if may_publish(TABLE[i], subject)} == expected, subject


def test_only_the_coordinator_creates_streams_and_consumers() -> None:
    for identity in IDENTITIES:
        creates = [
            s
            for s in TABLE[identity].nats.publish
            if ".STREAM.CREATE.MILES_" in s or "DURABLE" in s
        ]
        assert bool(creates) == (identity == "coordinator"), identity


def test_only_the_trainer_writes_manifests_latest_and_the_ledger() -> None:
    for key in (KEYS.manifest(7), KEYS.latest, KEYS.trained):
        assert {i for i in IDENTITIES if may_write(TABLE[i], key)} == {"trainer"}, key


def test_each_key_has_exactly_its_writers() -> None:
    writers = {
        KEYS.record: {"coordinator", "trainer"},  # the run; the trainer's commit moves its step
        KEYS.config: {"coordinator"},
        KEYS.evals: {"coordinator"},
        KEYS.batches: {"buffer"},
        KEYS.batched: {"buffer"},
        KEYS.filtered: {"rollout", "reward", "buffer"},
        KEYS.engines: {"rollout"},
        KEYS.stragglers: {"rollout"},
        KEYS.restarts: set(),  # `miles run`'s supervisor, as the embedded servers' admin
        KEYS.services: set(SERVICES),
        "miles:run:other-run": set(),
    }
    for key, expected in writers.items():
        assert {i for i in IDENTITIES if may_write(TABLE[i], key)} == expected, key


def test_no_service_reads_the_run_config_it_holds_credentials_in() -> None:
    readers = {i for i in IDENTITIES if may_read(TABLE[i], KEYS.config)}
    assert readers == {"coordinator", OPERATOR}


def test_everyone_listens_for_control_and_only_the_operator_reads_everything() -> None:
    for identity in IDENTITIES:
        assert may_subscribe(TABLE[identity], S.control("stop"))
        assert may_subscribe(TABLE[identity], f"{S.root}.>") == (identity == OPERATOR)
        assert not may_subscribe(TABLE[identity], ">")
    for key in run_keys(RUN):
        assert may_read(TABLE[OPERATOR], key)


def test_no_identity_may_administer_redis() -> None:
    admin = {"flushall", "flushdb", "config", "acl", "keys", "scan", "debug", "shutdown", "eval"}
    for identity in IDENTITIES:
        assert not admin & set(TABLE[identity].redis.commands), identity


@pytest.mark.parametrize("read_only", [True, False])
def test_the_redis_acl_turns_the_default_user_off_and_lists_each_user(read_only: bool) -> None:
    acl = access.redis_acl(TABLE.values(), {"admin": ">a", "rollout": "#00"}, read_only)
    default, admin, rollout = acl.splitlines()
    # Off, so no client is it; all rights, so Redis can replay the AOF's transactions as it.
    assert default == "user default off resetpass ~* &* +@all"
    assert admin == "user admin on >a ~* &* +@all"
    assert rollout.startswith("user rollout on #00 resetkeys ")
    assert (f"%R~{KEYS.record}" in rollout.split()) == read_only
    assert (f"~{KEYS.record}" in rollout.split()) == (not read_only)
    assert "-@all" in rollout.split() and "+hset" in rollout.split()


def test_the_nats_authorization_limits_each_user_but_the_admin() -> None:
    text = access.nats_authorization(TABLE.values(), {"admin": '"a"', "buffer": "$B"})
    admin, buffer = text.split("    {\n")[1:]
    assert "permissions" not in admin and 'password: "a"' in admin
    assert "password: $B" in buffer
    for subject in TABLE["buffer"].nats.publish:
        assert f'"{subject}"' in buffer

"""The wire contract: every event survives encode/decode, and every bad input gets its reason."""

import pickle

import msgspec
import pytest

from miles import events

RUN = "run-1"


def _sample(index: int = 0) -> events.Sample:
    return events.Sample(
        sample_id=f"t0/{index}",
        prompt="1+2=",
        label="3",
        prompt_ids=[3, 12, 4, 13],
        response_ids=[5, 1],
        response_logprobs=[-0.25, -1.5],
        response_text="3",
        finish_reason="stop",
        policy_version_first=2,
        policy_version_last=3,
        reward=1.0,
        failed=index == 1,
        error="boom" if index == 1 else "",
    )


EVERY_EVENT: list[events.Event] = [
    events.Task(
        run_id=RUN, policy_version=1, task_id="t0", prompt="1+2=", label="3", group_size=4, seed=7
    ),
    events.GeneratedGroup(
        run_id=RUN,
        policy_version=2,
        task_id="t0",
        split="train",
        eval_round=-1,
        samples=[_sample(0), _sample(1)],
        engine="e0",
        generate_seconds=0.5,
    ),
    events.ScoredGroup(
        run_id=RUN,
        policy_version=2,
        task_id="eval0-1",
        split="eval",
        eval_round=0,
        samples=[_sample(0)],
        score_seconds=0.01,
    ),
    events.Batch(
        run_id=RUN,
        policy_version=2,
        batch_id="b-1",
        task_ids=["t0", "t1"],
        samples=[
            events.TrainSample(
                sample_id="t0/0",
                prompt_ids=[1, 2],
                response_ids=[3],
                response_logprobs=[-0.1],
                advantage=0.5,
                reward=1.0,
                policy_version=2,
            )
        ],
    ),
    events.GroupFiltered(run_id=RUN, policy_version=2, task_id="t3", reason="zero_variance"),
    events.WeightsPublished(
        run_id=RUN, policy_version=3, uri="file:///w/v3", sha256="ab" * 32, step=3
    ),
    events.StepCommitted(
        run_id=RUN,
        policy_version=3,
        step=3,
        batch_id="b-1",
        task_ids=["t0", "t1"],
        sample_ids=["t0/0"],
        reward_mean=0.5,
        loss=0.1,
        grad_norm=2.0,
        kl=0.0,
        seconds={"train": 1.5},
    ),
    events.Control(run_id=RUN, policy_version=3, command="pause", reason="operator"),
    events.Heartbeat(
        run_id=RUN,
        policy_version=-1,
        service="reward",
        instance="host-1",
        pid=42,
        time=1.0,
        busy_seconds=2.0,
        wait_seconds=3.0,
        processed=4,
    ),
    events.EngineFlagged(
        run_id=RUN,
        policy_version=3,
        engine="host-1-engine-0",
        tokens_per_second=12.5,
        fleet_median=80.0,
        action="drained and restarted",
    ),
]


def test_every_event_type_is_covered() -> None:
    assert {type(e) for e in EVERY_EVENT} == set(events.AnyEvent.__args__)


@pytest.mark.parametrize("event", EVERY_EVENT, ids=lambda e: type(e).__name__)
def test_round_trip(event: events.Event) -> None:
    data = events.encode(event)
    assert events.decode(data, type(event), RUN) == event
    assert events.decode(data, events.Event, RUN) == event  # the base type accepts any event


def _reason(data: bytes, expected: type[events.Event] = events.Task) -> str:
    with pytest.raises(events.BadEvent) as info:
        events.decode(data, expected, RUN)
    assert str(info.value).startswith(info.value.reason + ": ")
    return info.value.reason


def test_not_msgpack() -> None:
    assert _reason(b"\xc1\xc1 garbage") == "not_msgpack"  # 0xc1 is never used by msgpack


def test_truncated_msgpack() -> None:
    assert _reason(events.encode(EVERY_EVENT[0])[:-3]) == "not_msgpack"


def test_pickle_is_refused_without_unpickling() -> None:
    payload = pickle.dumps({"kind": "task", "run_id": RUN})
    assert _reason(payload) == "pickle"


def test_schema() -> None:
    unknown_kind = msgspec.msgpack.encode({"kind": "nope", "run_id": RUN, "policy_version": 0})
    missing_field = msgspec.msgpack.encode({"kind": "task", "run_id": RUN, "policy_version": 0})
    not_an_object = msgspec.msgpack.encode([1, 2, 3])
    for data in (unknown_kind, missing_field, not_an_object):
        assert _reason(data) == "schema"


def test_schema_version() -> None:
    task = events.Task(run_id=RUN, policy_version=0, task_id="t0", prompt="p", schema=99)
    assert _reason(events.encode(task)) == "schema_version"


def test_run_id() -> None:
    task = events.Task(run_id="another-run", policy_version=0, task_id="t0", prompt="p")
    assert _reason(events.encode(task)) == "run_id"


def test_type() -> None:
    task = events.Task(run_id=RUN, policy_version=0, task_id="t0", prompt="p")
    assert _reason(events.encode(task), events.StepCommitted) == "type"


def test_unknown_fields_are_tolerated() -> None:
    """A newer producer may add optional fields within one schema version."""
    raw = msgspec.to_builtins(EVERY_EVENT[0])
    raw["added_later"] = "x"
    assert events.decode(msgspec.msgpack.encode(raw), events.Task, RUN) == EVERY_EVENT[0]


def test_optional_fields_keep_old_messages_decoding() -> None:
    """Fields added later have defaults: a batch or heartbeat encoded without them (by an
    older producer) still decodes under the same schema version."""

    class OldBatch(msgspec.Struct, kw_only=True, tag_field="kind", tag="batch"):
        schema: int = events.SCHEMA_VERSION
        run_id: str
        policy_version: int
        batch_id: str
        task_ids: list[str]
        samples: list[events.TrainSample]

    class OldHeartbeat(msgspec.Struct, kw_only=True, tag_field="kind", tag="heartbeat"):
        schema: int = events.SCHEMA_VERSION
        run_id: str
        policy_version: int
        service: str
        instance: str
        pid: int
        time: float
        busy_seconds: float
        wait_seconds: float
        processed: int

    old = OldBatch(run_id=RUN, policy_version=1, batch_id="b", task_ids=["t0"], samples=[])
    batch = events.decode(msgspec.msgpack.encode(old), events.Batch, RUN)
    assert batch.traceparents == []
    beat = OldHeartbeat(
        run_id=RUN,
        policy_version=-1,
        service="reward",
        instance="h",
        pid=1,
        time=1.0,
        busy_seconds=0.0,
        wait_seconds=0.0,
        processed=0,
    )
    decoded = events.decode(msgspec.msgpack.encode(beat), events.Heartbeat, RUN)
    assert (decoded.metrics_port, decoded.metrics) == (0, {})

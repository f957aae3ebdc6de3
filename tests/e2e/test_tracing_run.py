"""Traces of a real `miles run`: five service processes exported OTLP/HTTP (protobuf) to a
real receiver. Each training task is one trace across the coordinator, rollout, reward and
buffer processes; the trainer's step span links to the trace of every group it trained on;
each policy version has a weight-publish and a weight-load span."""

from __future__ import annotations

from collections import defaultdict

import pytest
from observability import Received
from observed import STEPS, ObservedRun

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SUBJECT = "miles.observed"
JOURNEY = (  # (span, its parent) down one task's trace
    (f"send {SUBJECT}.tasks", "dispatch"),
    (f"process {SUBJECT}.tasks", f"send {SUBJECT}.tasks"),
    ("generate", f"process {SUBJECT}.tasks"),
    (f"send {SUBJECT}.samples.generated", f"process {SUBJECT}.tasks"),
    (f"process {SUBJECT}.samples.generated", f"send {SUBJECT}.samples.generated"),
    ("score", f"process {SUBJECT}.samples.generated"),
    (f"send {SUBJECT}.samples.scored", f"process {SUBJECT}.samples.generated"),
    (f"process {SUBJECT}.samples.scored", f"send {SUBJECT}.samples.scored"),
)
SERVICE_OF = {
    "dispatch": "coordinator",
    f"send {SUBJECT}.tasks": "coordinator",
    f"process {SUBJECT}.tasks": "rollout",
    "generate": "rollout",
    f"send {SUBJECT}.samples.generated": "rollout",
    f"process {SUBJECT}.samples.generated": "reward",
    "score": "reward",
    f"send {SUBJECT}.samples.scored": "reward",
    f"process {SUBJECT}.samples.scored": "buffer",
}


class Traces:
    def __init__(self, spans: list[Received]) -> None:
        self.spans = spans
        self.by_trace: dict[bytes, list[Received]] = defaultdict(list)
        for received in spans:
            self.by_trace[received.span.trace_id].append(received)

    def named(self, name: str, **attributes: object) -> list[Received]:
        return [
            r
            for r in self.spans
            if r.span.name == name
            and all(r.attributes.get(key) == value for key, value in attributes.items())
        ]

    def one(self, name: str, **attributes: object) -> Received:
        found = self.named(name, **attributes)
        assert len(found) == 1, f"{len(found)} spans {name!r} {attributes}"
        return found[0]


@pytest.fixture(scope="module")
def traces(observed_run: ObservedRun) -> Traces:
    return Traces(observed_run.receiver.spans)


def test_one_trace_per_task_across_four_processes(
    observed_run: ObservedRun, traces: Traces
) -> None:
    trained = [task_id for step in observed_run.steps for task_id in step["task_ids"]]
    assert len(trained) == STEPS * 8
    for task_id in trained:
        root = traces.one("dispatch", **{"miles.task_id": task_id})
        assert root.span.parent_span_id == b""
        trace = {r.span.name: r for r in traces.by_trace[root.span.trace_id]}
        for name, parent in JOURNEY:
            assert name in trace, f"{task_id}: no {name!r} in {sorted(trace)}"
            assert trace[name].span.parent_span_id == trace[parent].span.span_id, (task_id, name)
        for name, service in SERVICE_OF.items():
            assert trace[name].resource["service.name"] == f"miles-{service}"
            assert trace[name].resource["miles.run_id"] == "observed"
        instances = {trace[name].resource["service.instance.id"] for name in SERVICE_OF}
        assert len(instances) == 4  # four OS processes took part in this one trace
        consumer = trace[f"process {SUBJECT}.samples.scored"].attributes
        assert consumer["messaging.consumer.group.name"] == "buffer"
        assert consumer["messaging.system"] == "nats"
        generate = trace["generate"].attributes
        assert generate["miles.engine"]
        assert generate["gen_ai.usage.input_tokens"] > 0
        assert generate["gen_ai.usage.output_tokens"] > 0
        assert generate["miles.generate_seconds"] > 0


def test_step_span_links_every_trace_it_trained_on(
    observed_run: ObservedRun, traces: Traces
) -> None:
    for step in observed_run.steps:
        span = traces.one("train step", **{"miles.step": step["step"]})
        assert span.resource["service.name"] == "miles-trainer"
        linked = {link.trace_id for link in span.span.links}
        tasks = {
            traces.one("dispatch", **{"miles.task_id": task_id}).span.trace_id
            for task_id in step["task_ids"]
        }
        assert linked == tasks
        # The step runs in the batch's own trace: buffer "batch" -> send -> trainer process.
        trace = {r.span.name: r for r in traces.by_trace[span.span.trace_id]}
        assert trace["batch"].resource["service.name"] == "miles-buffer"
        assert {link.trace_id for link in trace["batch"].span.links} == tasks
        process = trace[f"process {SUBJECT}.batches"]
        assert span.span.parent_span_id == process.span.span_id
        assert process.span.parent_span_id == trace[f"send {SUBJECT}.batches"].span.span_id


def test_weight_publish_and_load_per_version(traces: Traces) -> None:
    for version in range(1, STEPS + 1):
        publish = traces.one("publish weights", **{"miles.policy_version": version})
        assert publish.resource["service.name"] == "miles-trainer"
        send = traces.one(
            f"send {SUBJECT}.weights", **{"messaging.message.id": f"weights/v{version}"}
        )
        load = traces.one("load weights", **{"miles.policy_version": version})
        assert load.resource["service.name"] == "miles-rollout"
        assert [(link.trace_id, link.span_id) for link in load.span.links] == [
            (send.span.trace_id, send.span.span_id)
        ]


def test_spans_per_step(observed_run: ObservedRun, traces: Traces) -> None:
    """Counted for the README: every span of one step's task traces, its batch trace and the
    load of the weights it produced."""
    counts = []
    for step in observed_run.steps:
        tasks = [traces.one("dispatch", **{"miles.task_id": t}) for t in step["task_ids"]]
        spans = sum(len(traces.by_trace[root.span.trace_id]) for root in tasks)
        span = traces.one("train step", **{"miles.step": step["step"]})
        spans += len(traces.by_trace[span.span.trace_id])
        spans += len(traces.named("load weights", **{"miles.policy_version": step["step"]}))
        counts.append(spans)
    print(f"spans per step: {counts}; all spans: {len(traces.spans)} for {STEPS} steps")
    assert all(count >= 8 * len(JOURNEY) for count in counts)

"""Traces across processes and NATS: two OS processes export over OTLP/HTTP to a real receiver.

A "rollout" process publishes two groups to JetStream, each under its own root span, with the
trace context in the NATS headers and a ``traceparent`` in the payload. A "trainer" process
consumes them in ``process`` spans, then makes two spans that link to the groups: one from the
headers, one from the payload's traceparents. The receiver decodes the protobuf bodies exactly
as a collector would (``ExportTraceServiceRequest``) and the test checks the trace tree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from observability import OtlpReceiver, serve_otlp
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from miles.runtime import embedded
from miles.runtime.subjects import Subjects

pytestmark = pytest.mark.integration

RUN_ID = "trace-1"
SUBJECTS = Subjects(RUN_ID)

PRODUCER = """
import asyncio, json, os, sys
import nats
from opentelemetry import trace
from miles import telemetry

async def main(url: str, subject: str, stream: str) -> None:
    telemetry.setup_tracing("rollout", "trace-1", f"rollout-{os.getpid()}")
    tracer = trace.get_tracer("test")
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=[subject])
    for i in range(2):
        with tracer.start_as_current_span(f"generate group-{i}"):
            payload = {"traceparent": telemetry.current_traceparent()}
            headers = {"Nats-Msg-Id": f"group-{i}"}
            with telemetry.send_span(subject, f"group-{i}", headers):
                await js.publish(subject, json.dumps(payload).encode(), headers=headers)
    await nc.close()
    telemetry.shutdown_tracing()

asyncio.run(main(*sys.argv[1:]))
print(os.getpid())
"""

CONSUMER = """
import asyncio, json, os, sys
import nats
from miles import telemetry

async def main(url: str, subject: str, stream: str) -> None:
    telemetry.setup_tracing("trainer", "trace-1", f"trainer-{os.getpid()}")
    nc = await nats.connect(url)
    js = nc.jetstream()
    subscription = await js.pull_subscribe(subject, durable="trainer", stream=stream)
    messages = []
    while len(messages) < 2:
        messages += await subscription.fetch(2 - len(messages), timeout=10)
    traceparents = []
    for msg in messages:
        message_id = msg.headers["Nats-Msg-Id"]
        with telemetry.process_span(msg.subject, message_id, "trainer", msg.headers):
            traceparents.append(json.loads(msg.data)["traceparent"])
            await msg.ack()
    step_links = telemetry.links_from(headers=[msg.headers for msg in messages])
    with telemetry.linked_span("train step", step_links):
        pass
    with telemetry.linked_span("build batch", telemetry.links_from(traceparents=traceparents)):
        pass
    await nc.close()
    telemetry.shutdown_tracing()

asyncio.run(main(*sys.argv[1:]))
print(os.getpid())
"""


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with serve_otlp() as state:
        yield state


def run(snippet: str, env: dict[str, str], nats_url: str) -> int:
    """Run a snippet in its own Python process; return its pid."""
    argv = [sys.executable, "-c", snippet, nats_url, SUBJECTS.generated, "TRACE_GENERATED"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def test_receiver_rejects_what_is_not_protobuf(receiver: OtlpReceiver) -> None:
    body = json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [{"name": "x"}]}]}]})
    request = urllib.request.Request(
        f"http://127.0.0.1:{receiver.port}/v1/traces",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=5)
    assert error.value.code == 400
    assert receiver.spans == []


def test_one_trace_across_processes_and_nats(
    receiver: OtlpReceiver, nats_server: embedded.Server
) -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")}
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{receiver.port}"
    producer_pid = run(PRODUCER, {**env, "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"}, nats_server.url)
    consumer_pid = run(CONSUMER, env, nats_server.url)
    assert producer_pid != consumer_pid

    # Both processes exported real protobuf, one of them gzipped.
    assert set(receiver.content_types) == {"application/x-protobuf"}
    assert set(receiver.encodings) == {"gzip", "identity"}

    subject = SUBJECTS.generated
    for i in range(2):
        root = receiver.named(f"generate group-{i}")
        send = receiver.named(f"send {subject}", f"group-{i}")
        process = receiver.named(f"process {subject}", f"group-{i}")

        # The producer's spans come from one process, the consumer's from the other.
        assert root.resource == send.resource
        assert send.resource["service.name"] == "miles-rollout"
        assert send.resource["service.instance.id"] == f"rollout-{producer_pid}"
        assert process.resource["service.name"] == "miles-trainer"
        assert process.resource["service.instance.id"] == f"trainer-{consumer_pid}"
        assert send.resource["miles.run_id"] == process.resource["miles.run_id"] == RUN_ID

        # One trace: root -> send (PRODUCER) -> process (CONSUMER), across the bus.
        assert root.span.parent_span_id == b""
        assert send.span.trace_id == root.span.trace_id == process.span.trace_id
        assert send.span.parent_span_id == root.span.span_id
        assert process.span.parent_span_id == send.span.span_id
        assert send.span.kind == Span.SpanKind.SPAN_KIND_PRODUCER
        assert process.span.kind == Span.SpanKind.SPAN_KIND_CONSUMER
        messaging = {
            "messaging.system": "nats",
            "messaging.destination.name": subject,
            "messaging.message.id": f"group-{i}",
        }
        assert send.attributes == {
            **messaging,
            "messaging.operation.type": "send",
            "messaging.operation.name": "send",
        }
        assert process.attributes == {
            **messaging,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.consumer.group.name": "trainer",
        }

    roots = [receiver.named(f"generate group-{i}").span for i in range(2)]
    sends = [receiver.named(f"send {subject}", f"group-{i}").span for i in range(2)]
    assert roots[0].trace_id != roots[1].trace_id  # each group is its own journey

    # A span that gathers many messages links to each one's trace instead of joining one.
    step = receiver.named("train step").span
    assert {(link.trace_id, link.span_id) for link in step.links} == {
        (send.trace_id, send.span_id) for send in sends
    }
    batch = receiver.named("build batch").span
    assert {(link.trace_id, link.span_id) for link in batch.links} == {
        (root.trace_id, root.span_id) for root in roots
    }
    assert step.trace_id not in {root.trace_id for root in roots}

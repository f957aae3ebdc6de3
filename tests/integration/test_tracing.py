"""Traces across processes and NATS: two OS processes export over OTLP/HTTP to a real receiver.

A "rollout" process publishes two groups to JetStream, each under its own root span, with the
trace context in the NATS headers and a ``traceparent`` in the payload. A "trainer" process
consumes them in ``process`` spans, then makes two spans that link to the groups: one from the
headers, one from the payload's traceparents. The receiver decodes the protobuf bodies exactly
as a collector would (``ExportTraceServiceRequest``) and the test checks the trace tree.
"""

from __future__ import annotations

import gzip
import http.server
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from miles import embedded
from miles.subjects import Subjects

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


@dataclass
class Received:
    """One span as the receiver decoded it, with its resource's attributes."""

    span: Span
    resource: dict[str, Any]

    @property
    def attributes(self) -> dict[str, Any]:
        return attributes(self.span.attributes)


@dataclass
class OtlpReceiver:
    """A minimal OTLP/HTTP trace endpoint: POST /v1/traces with a protobuf body."""

    port: int = 0
    spans: list[Received] = field(default_factory=list)
    content_types: list[str] = field(default_factory=list)
    encodings: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, path: str, headers: Any, body: bytes) -> tuple[int, bytes]:
        if path != "/v1/traces":
            return 404, b""
        encoding = headers.get("Content-Encoding", "identity")
        if encoding == "gzip":
            body = gzip.decompress(body)
        try:
            request = ExportTraceServiceRequest.FromString(body)
        except DecodeError:
            return 400, b"not an OTLP protobuf body"
        with self.lock:
            self.content_types.append(headers.get("Content-Type", ""))
            self.encodings.append(encoding)
            for resource_spans in request.resource_spans:
                resource = attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    self.spans += [Received(span, resource) for span in scope_spans.spans]
        return 200, ExportTraceServiceResponse().SerializeToString()

    def named(self, name: str, message_id: str | None = None) -> Received:
        found = [
            received
            for received in self.spans
            if received.span.name == name
            and (message_id is None or received.attributes["messaging.message.id"] == message_id)
        ]
        assert len(found) == 1, f"{len(found)} spans named {name!r} ({message_id})"
        return found[0]


def attributes(pairs: Any) -> dict[str, Any]:
    def value(pair: KeyValue) -> Any:
        kind = pair.value.WhichOneof("value")
        return getattr(pair.value, kind) if kind else None

    return {pair.key: value(pair) for pair in pairs}


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    state = OtlpReceiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            status, reply = state.handle(self.path, self.headers, body)
            self.send_response(status)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join()


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

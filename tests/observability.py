"""Test helpers for telemetry, shared by the unit, integration and end-to-end tests: a real
OTLP/HTTP trace receiver that decodes protobuf as a collector would, and the PromQL that
deploy/'s dashboards and alert rules query."""

from __future__ import annotations

import contextlib
import gzip
import http.server
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

DEPLOY = Path(__file__).parents[1] / "deploy"


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


@contextlib.contextmanager
def serve_otlp() -> Iterator[OtlpReceiver]:
    """A receiver on a free loopback port, for as long as the block runs."""
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
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# --- PromQL in deploy/ ---------------------------------------------------------------------

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
PROMQL_KEYWORDS |= {"and", "or", "unless", "offset", "inf", "nan"}
PROMETHEUS_SERIES = {"up"}
"""Series Prometheus writes itself for every target."""


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords,
    label names, durations or Grafana variables."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, formats)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors and subqueries
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\boffset\s+-?[0-9a-z]+", "", expr)
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables
    names = set()
    for match in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        if match.group(2) is None and match.group(1) not in PROMQL_KEYWORDS:
            names.add(match.group(1))
    return names


def _dashboard_queries(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("expr"), str):
            yield node["expr"]
        for value in node.values():
            yield from _dashboard_queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from _dashboard_queries(item)


def deployed_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard panel, dashboard variable and alert rule."""
    queries = []
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        queries += [(path.name, expr) for expr in _dashboard_queries(dashboard["panels"])]
        for variable in dashboard["templating"]["list"]:
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            metric = re.fullmatch(r"label_values\((\w+),\s*\w+\)", query)
            assert metric, f"{path.name}: variable {variable['name']}: {query}"
            queries.append((path.name, metric.group(1)))
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for group in alerts["groups"]:
        queries += [(f"alerts.yml {rule['alert']}", rule["expr"]) for rule in group["rules"]]
    return queries

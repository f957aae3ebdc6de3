"""Observability: OpenTelemetry traces across NATS and Prometheus metrics per process."""

from miles.telemetry.metrics import (
    BleedSide,
    Family,
    Metrics,
    Phase,
    start_metrics_server,
)
from miles.telemetry.tracing import (
    current_traceparent,
    extract,
    inject,
    link_from_headers,
    link_from_traceparent,
    linked_span,
    links_from,
    process_span,
    record_span,
    root_span,
    send_span,
    setup_tracing,
    shutdown_tracing,
    span,
)

__all__ = [
    "BleedSide",
    "Family",
    "Metrics",
    "Phase",
    "current_traceparent",
    "extract",
    "inject",
    "link_from_headers",
    "link_from_traceparent",
    "linked_span",
    "links_from",
    "process_span",
    "record_span",
    "root_span",
    "send_span",
    "setup_tracing",
    "shutdown_tracing",
    "span",
    "start_metrics_server",
]

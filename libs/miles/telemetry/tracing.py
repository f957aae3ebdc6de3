"""OpenTelemetry traces across NATS: setup from ``OTEL_*``, W3C propagation, messaging spans.

One sample's journey (task → generate → score → batch) is one trace: every publish runs in a
``send <subject>`` PRODUCER span whose context rides in the NATS headers (``traceparent``), and
every handler runs in a ``process <subject>`` CONSUMER span parented by it. Where one message is
built from many (the buffer's batch from many groups, the trainer's step from many samples) a
span cannot have many parents, so it gets *links* instead: to contexts extracted from many
header dicts, or to ``traceparent`` strings carried inside the events.

Names and attributes follow the OpenTelemetry messaging conventions (span name
``{operation} {destination}``, ``messaging.*`` attributes), written as plain strings so no
unstable semconv package is needed.

Without an exporter configured nothing is installed: the API's global tracer stays the no-op
one, whose spans are non-recording and cost a context lookup. The no-op tracer still hands an
incoming context through (a non-recording span carrying the remote parent), so a service with
tracing off does not break the trace of the services around it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import Link, Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

log = logging.getLogger(__name__)

_tracer = trace.get_tracer("miles")  # a proxy: it follows the provider setup_tracing installs
_traceparent = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None

MESSAGING_SYSTEM = "nats"
OTLP_PROTOCOL = "http/protobuf"
"""The one OTLP transport shipped (opentelemetry-exporter-otlp-proto-http): collectors and
Jaeger accept it on 4318, and it needs no grpcio."""


def setup_tracing(service: str, run_id: str, instance: str) -> None:
    """Install the SDK tracer provider for this process, configured by the ``OTEL_*`` variables.

    Exporters come from ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``, ``none``, comma
    separated). When it is unset, OTLP is used if ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, and nothing is installed otherwise. The sampler
    (``OTEL_TRACES_SAMPLER``, ``OTEL_TRACES_SAMPLER_ARG``), batching (``OTEL_BSP_*``), limits
    (``OTEL_SPAN_*``) and extra resource attributes (``OTEL_RESOURCE_ATTRIBUTES``) are read by
    the SDK itself. ``OTEL_SERVICE_NAME`` overrides the default ``miles-<service>``.

    The first call in a process wins: a process that hosts several services in tests keeps one
    provider (OpenTelemetry allows setting the global provider once).
    """
    global _provider
    if _provider is not None:
        return
    exporters = _exporters_from_env()
    if not exporters:
        log.debug("tracing off: no OTEL_EXPORTER_OTLP_ENDPOINT nor OTEL_TRACES_EXPORTER")
        return
    resource = Resource.create(
        {
            "service.name": os.environ.get("OTEL_SERVICE_NAME") or f"miles-{service}",
            "service.instance.id": instance,
            "miles.run_id": run_id,
        }
    )
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        if isinstance(exporter, ConsoleSpanExporter):
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    log.info("tracing on: %s exports %s", resource.attributes["service.name"], exporters)


def shutdown_tracing() -> None:
    """Export what is buffered and stop the exporters; call before the process exits."""
    if _provider is not None:
        _provider.force_flush()
        _provider.shutdown()


def _exporters_from_env() -> list[SpanExporter]:
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    configured = os.environ.get("OTEL_TRACES_EXPORTER", "").strip()
    names = [name.strip() for name in configured.split(",") if name.strip()]
    if not names:
        names = ["otlp"] if endpoint else []
    exporters: list[SpanExporter] = []
    for name in names:
        if name == "none":
            continue
        if name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name == "otlp":
            exporters.append(_otlp_exporter())
        else:
            raise ValueError(
                f"OTEL_TRACES_EXPORTER={configured!r}: miles ships 'otlp' (over HTTP), "
                "'console' and 'none'"
            )
    return exporters


def _otlp_exporter() -> SpanExporter:
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", OTLP_PROTOCOL
    )
    if protocol != OTLP_PROTOCOL:
        raise ValueError(
            f"OTLP protocol {protocol!r} is not shipped: set OTEL_EXPORTER_OTLP_PROTOCOL="
            f"{OTLP_PROTOCOL} and point the endpoint at the collector's HTTP port (4318)"
        )
    # Imported here: the exporter pulls in requests and protobuf, which a process with
    # tracing off never needs.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, timeout, compression: from OTEL_EXPORTER_OTLP_*


# --- propagation: the one place trace context enters and leaves a message -------------------


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Write the current trace context (``traceparent``, ``tracestate``) into ``headers``.

    Uses the global propagator, W3C trace-context and baggage unless ``OTEL_PROPAGATORS`` says
    otherwise. Returns ``headers`` so a publish can pass ``inject({"Nats-Msg-Id": msg_id})``.
    """
    propagate.inject(headers)
    return headers


def extract(headers: Mapping[str, str] | None) -> Context:
    """The context carried by a message's headers (an empty one when it has none)."""
    return propagate.extract(headers or {})


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span, to carry inside an event.

    For when headers are not enough: one batch is built from many groups, and each group's
    context must survive into the batch so the trainer's step can link to it. ``None`` when
    there is no valid span (tracing off and no incoming context).
    """
    carrier: dict[str, str] = {}
    _traceparent.inject(carrier)
    return carrier.get("traceparent")


def link_from_traceparent(traceparent: str | None) -> Link | None:
    """A link to the span a ``traceparent`` string names; ``None`` if it is empty or invalid."""
    if not traceparent:
        return None
    return _link(_traceparent.extract({"traceparent": traceparent}))


def link_from_headers(headers: Mapping[str, str] | None) -> Link | None:
    """A link to the span whose context a message's headers carry; ``None`` if they carry none."""
    return _link(extract(headers))


def links_from(
    headers: Iterable[Mapping[str, str] | None] = (), traceparents: Iterable[str | None] = ()
) -> list[Link]:
    """Links to every valid context among many header dicts and ``traceparent`` strings.

    The SDK keeps at most ``OTEL_SPAN_LINK_COUNT_LIMIT`` links per span (128 by default):
    link per group, not per sample, or raise the limit.
    """
    found = [link_from_headers(h) for h in headers]
    found += [link_from_traceparent(t) for t in traceparents]
    return [link for link in found if link is not None]


def _link(ctx: Context) -> Link | None:
    span_context = trace.get_current_span(ctx).get_span_context()
    return Link(span_context) if span_context.is_valid else None


# --- spans ------------------------------------------------------------------------------------


def _messaging_attributes(subject: str, message_id: str, operation: str) -> dict[str, str]:
    return {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.destination.name": subject,
        "messaging.message.id": message_id,
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
    }


@contextlib.contextmanager
def send_span(
    subject: str, message_id: str, headers: dict[str, str] | None = None
) -> Iterator[Span]:
    """A PRODUCER span ``send <subject>`` around one publish.

    When ``headers`` is given, the span's context is injected into it, so the message carries
    this span as the parent of whatever processes it.
    """
    with _tracer.start_as_current_span(
        f"send {subject}",
        kind=SpanKind.PRODUCER,
        attributes=_messaging_attributes(subject, message_id, "send"),
    ) as span:
        if headers is not None:
            inject(headers)
        yield span


@contextlib.contextmanager
def process_span(
    subject: str,
    message_id: str,
    consumer_group: str,
    parent_headers: Mapping[str, str] | None,
    links: Sequence[Link] = (),
    start_time: int | None = None,
) -> Iterator[Span]:
    """A CONSUMER span ``process <subject>`` around handling one message, made current.

    Its parent is the producer's span from ``parent_headers`` (so the sample's journey stays one
    trace); with no context in the headers it starts a new trace. ``consumer_group`` is the
    durable consumer the replicas share. ``start_time`` (ns since the epoch) backdates the span
    to when handling began, for handlers that batch work and open the span afterwards.
    """
    attributes = _messaging_attributes(subject, message_id, "process")
    attributes["messaging.consumer.group.name"] = consumer_group
    with _tracer.start_as_current_span(
        f"process {subject}",
        context=extract(parent_headers),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
        links=links,
        start_time=start_time,
    ) as span:
        yield span


@contextlib.contextmanager
def root_span(
    name: str, attributes: Attributes = None, links: Sequence[Link] = ()
) -> Iterator[Span]:
    """An INTERNAL span that starts a new trace whatever is current: one task's journey (the
    coordinator's dispatch), or one batch built from many traces (linked, not joined)."""
    with _tracer.start_as_current_span(
        name, context=Context(), attributes=attributes, links=links
    ) as span:
        yield span


@contextlib.contextmanager
def span(name: str, attributes: Attributes = None) -> Iterator[Span]:
    """An INTERNAL span under the current one: a step inside a handler."""
    with _tracer.start_as_current_span(name, attributes=attributes) as current:
        yield current


def record_span(name: str, start_time: int, end_time: int, attributes: Attributes = None) -> None:
    """A finished INTERNAL span under the current one, for work timed elsewhere (a batched
    engine call that served many messages): times in ns since the epoch."""
    _tracer.start_span(name, start_time=start_time, attributes=attributes).end(end_time=end_time)


@contextlib.contextmanager
def linked_span(name: str, links: Sequence[Link], attributes: Attributes = None) -> Iterator[Span]:
    """An INTERNAL span under the current one, linked to spans of other traces.

    The trainer's step: ``linked_span("train step", links_from(traceparents=...))`` ties the
    step to every sample trace it consumed without making it part of any one of them.
    """
    with _tracer.start_as_current_span(name, links=links, attributes=attributes) as span:
        yield span

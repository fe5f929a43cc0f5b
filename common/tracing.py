"""OpenTelemetry tracing, configured here and nowhere else: off unless a collector is named.

- On when BANK_OTEL_ENDPOINT, or else the standard OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or
  OTEL_EXPORTER_OTLP_ENDPOINT, is set: an SDK tracer provider whose spans go to that OTLP/gRPC
  collector through a bounded batch processor (a thread; a collector that is down costs dropped
  spans, never a blocked request), a server span per RPC and a client span per internal RPC
  (opentelemetry-instrumentation-grpc), and a consumer span per Kafka event, parented by the
  `traceparent` header its outbox row was given in the request that wrote it. Sampling follows
  the standard OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (default: parent-based, always on).
- Off (the default): no SDK, no exporter, no interceptor, no span. A W3C `traceparent` that a
  caller sent (through Envoy, which forwards it as it is) or that an event carries is still
  passed along: it becomes the context of the RPC or event, so log lines carry its trace id and
  events written meanwhile carry it on. Costs nothing when no `traceparent` comes in.

common/server.py calls setup() once per process and shutdown() at the end; the interceptor,
the internal channels, the outbox writer, the consumer and the log formatter use the helpers
below.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.trace import NonRecordingSpan, SpanKind

TRACEPARENT_HEADER = "traceparent"
# The batch processor's bounds: spans waiting for export, spans per export, and how long an
# export may take before it is given up (then those spans are dropped).
QUEUE_MAX_SPANS = 2048
EXPORT_BATCH_MAX_SPANS = 512
EXPORT_INTERVAL_MS = 1000
EXPORT_TIMEOUT_MS = 10_000
INSTRUMENTATION_NAME = "simplebank"

_provider: Any = None  # the SDK TracerProvider while tracing is on
_tracer: trace.Tracer | None = None
_global_provider_set = False


def endpoint_from_env(configured: str) -> str:
    """The collector traces go to: BANK_OTEL_ENDPOINT, else the standard variables, else ''."""
    return (configured or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "")
            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""))


def enabled() -> bool:
    return _tracer is not None


def setup(service: str, endpoint: str, exporter: Any = None) -> bool:
    """Turn tracing on when endpoint (or exporter, e.g. the SDK's InMemorySpanExporter in tests)
    is given; return whether it is on. The SDK is imported only then."""
    global _provider, _tracer, _global_provider_set
    if not endpoint and exporter is None:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    resource = Resource.create({"service.name": service,
                                "service.instance.id": f"{socket.gethostname()}-{os.getpid()}"})
    provider = TracerProvider(resource=resource)
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://")),
            max_queue_size=QUEUE_MAX_SPANS, schedule_delay_millis=EXPORT_INTERVAL_MS,
            max_export_batch_size=EXPORT_BATCH_MAX_SPANS, export_timeout_millis=EXPORT_TIMEOUT_MS))
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    if not _global_provider_set:  # for libraries that trace on their own; OpenTelemetry takes one per process
        trace.set_tracer_provider(provider)
        _global_provider_set = True
    shutdown()  # a provider set up before (tests) stops
    _provider = provider
    _tracer = provider.get_tracer(INSTRUMENTATION_NAME)
    return True


def shutdown() -> None:
    """Export what is still queued (bounded by EXPORT_TIMEOUT_MS), then stop."""
    global _provider, _tracer
    if _provider is not None:
        _provider.shutdown()
    _provider, _tracer = None, None


def server_interceptors() -> list[Any]:
    """A server span per RPC (health checks left out), parented by the caller's traceparent."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    health = filters.negate(filters.health_check())
    return [aio_server_interceptor(tracer_provider=_provider, filter_=health)]  # type: ignore[no-untyped-call]


def client_interceptors() -> list[Any]:
    """A client span per outgoing RPC, which sends its traceparent as metadata."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors(tracer_provider=_provider))  # type: ignore[no-untyped-call]


def continue_remote(traceparent: str | None) -> object | None:
    """Tracing off: make the caller's traceparent the context of this RPC (pass-through); returns
    the token for detach(). Tracing on, the server interceptor has done this already."""
    if not traceparent or _tracer is not None:
        return None
    remote = propagate.extract({TRACEPARENT_HEADER: traceparent})
    if not trace.get_current_span(remote).get_span_context().is_valid:
        return None
    return context.attach(remote)


def detach(token: object | None) -> None:
    if token is not None:
        context.detach(token)  # type: ignore[arg-type]


def headers() -> dict[str, str]:
    """The current trace context as W3C headers (empty outside a trace), for an outbox event."""
    if not trace.get_current_span().get_span_context().is_valid:
        return {}
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


@contextlib.contextmanager
def consuming(event_headers: Mapping[str, str], *, topic: str, partition: int, offset: int, group: str,
              event_type: str) -> Iterator[None]:
    """The context of handling one Kafka event: a consumer span whose parent is the event's
    traceparent (tracing on), or that traceparent passed through (tracing off)."""
    parent = propagate.extract(dict(event_headers)) if TRACEPARENT_HEADER in event_headers else None
    if _tracer is None:
        token = context.attach(parent) if parent is not None else None
        try:
            yield
        finally:
            detach(token)
        return
    attributes: dict[str, str | int] = {"messaging.system": "kafka", "messaging.operation.type": "process",
                  "messaging.destination.name": topic, "messaging.destination.partition.id": str(partition),
                  "messaging.kafka.offset": offset, "messaging.consumer.group.name": group,
                  "messaging.message.type": event_type}
    with _tracer.start_as_current_span(f"process {topic}", context=parent, kind=SpanKind.CONSUMER,
                                       attributes=attributes):
        yield


def current_ids() -> tuple[str, str]:
    """(trace_id, span_id) of the current context as hex, '' when there is none; the span id
    only for a span of this process (a passed-through context has the caller's)."""
    span = trace.get_current_span()
    span_context = span.get_span_context()
    if not span_context.is_valid:
        return "", ""
    span_id = "" if isinstance(span, NonRecordingSpan) else format(span_context.span_id, "016x")
    return format(span_context.trace_id, "032x"), span_id

"""Tracing (common/tracing.py): off, nothing of the SDK is even loaded; on, a real grpc.aio
server and client in this process make one trace of client and server spans (in the SDK's
in-memory exporter), the bank's log lines carry its ids, an event written in it carries its
traceparent, and a consumer's span of a real Kafka record joins the trace of that header. Off,
a traceparent that came in is passed through. (Through Envoy: tests/test_ops.py follows a
transfer whose traceparent reaches svc_transfer's log line.)"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import grpc
import pytest
from bank.events.v1 import events_pb2
from google.protobuf.message import Message
from google.protobuf.wrappers_pb2 import StringValue
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from common import auth, tracing
from common.config import REPO_ROOT, Settings
from common.consumer import EventConsumer, EventMeta, Route
from common.interceptors import ServerInterceptor
from common.logging import JsonFormatter
from tests.events_support import publish, scratch_topic

SERVICE = "test.Echo"


def test_without_a_collector_tracing_is_off_and_the_sdk_is_not_loaded() -> None:
    """What common/server.py does at start, in a fresh interpreter with no OTEL_* variables."""
    code = (
        "import sys\n"
        "from common import config, server, tracing\n"
        "settings = config.load()\n"
        "assert not tracing.setup('svc_test', tracing.endpoint_from_env(settings.otel_endpoint))\n"
        "assert not tracing.enabled() and tracing.server_interceptors() == [] and tracing.client_interceptors() == []\n"
        "assert tracing.headers() == {} and tracing.current_ids() == ('', '')\n"
        # (redis loads opentelemetry.sdk.metrics for its own optional metrics; the tracing SDK is ours)
        "loaded = sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk.trace', 'opentelemetry.exporter',\n"
        "                                                         'opentelemetry.instrumentation.grpc')))\n"
        "assert not loaded, loaded\n"
        "from opentelemetry import trace\n"
        "assert type(trace.get_tracer_provider()).__name__ == 'ProxyTracerProvider'\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "BANK_OTEL_"))}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr


def test_a_collector_from_the_standard_variable_turns_it_on() -> None:
    os.environ.pop("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None)
    assert tracing.endpoint_from_env("http://collector:4317") == "http://collector:4317"
    saved = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://otel:4317"
    try:
        assert tracing.endpoint_from_env("") == "http://otel:4317"
    finally:
        if saved is None:
            del os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"]
        else:
            os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = saved


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.setup("svc_test", "", exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.shutdown()
    assert not tracing.enabled()


class _Lines(logging.Handler):
    """The bank's JSON lines, formatted as the process's handler does: inside the log call."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter("svc_test"))
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def log_lines() -> Iterator[list[dict[str, Any]]]:
    handler = _Lines()
    root = logging.getLogger()
    saved_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)


def _stub(channel: grpc.aio.Channel, method: str) -> Any:
    return channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=StringValue.SerializeToString,
                               response_deserializer=StringValue.FromString)


@pytest.fixture
async def echo_server() -> AsyncIterator[tuple[str, dict[str, dict[str, str]]]]:
    """A grpc.aio server with the bank's interceptor chain (tracing's first, as common/server.py
    builds it): Outer calls Inner over a channel with tracing's client interceptors; Inner
    returns what an outbox event written there would carry. Public methods: no token."""
    seen: dict[str, dict[str, str]] = {}
    channels: list[grpc.aio.Channel] = []

    async def inner(request: StringValue, context: grpc.aio.ServicerContext) -> StringValue:
        seen["inner"] = tracing.headers()
        return request

    async def outer(request: StringValue, context: grpc.aio.ServicerContext) -> StringValue:
        return cast(StringValue, await _stub(channels[0], "Inner")(request, timeout=5))

    authenticator = auth.Authenticator(cast(Any, None), cast(Any, None), "", {f"/{SERVICE}/": auth.Access.PUBLIC})
    server = grpc.aio.server(interceptors=[*tracing.server_interceptors(), ServerInterceptor(authenticator)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
        name: grpc.unary_unary_rpc_method_handler(handler, request_deserializer=StringValue.FromString,
                                                  response_serializer=StringValue.SerializeToString)
        for name, handler in (("Outer", outer), ("Inner", inner))})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=tracing.client_interceptors()))
    try:
        yield f"127.0.0.1:{port}", seen
    finally:
        await channels[0].close()
        await server.stop(None)


async def test_a_call_through_two_services_is_one_trace_and_its_log_lines_carry_it(
        spans: InMemorySpanExporter, echo_server: tuple[str, dict[str, dict[str, str]]],
        log_lines: list[dict[str, Any]]) -> None:
    address, seen = echo_server
    async with grpc.aio.insecure_channel(address, interceptors=tracing.client_interceptors()) as channel:
        assert await _stub(channel, "Outer")(StringValue(value="hi"), timeout=5) == StringValue(value="hi")
    finished = spans.get_finished_spans()
    by_kind = {(span.kind, span.name): span for span in finished}
    client_outer = by_kind[(SpanKind.CLIENT, f"/{SERVICE}/Outer")]
    server_outer = by_kind[(SpanKind.SERVER, f"/{SERVICE}/Outer")]
    client_inner = by_kind[(SpanKind.CLIENT, f"/{SERVICE}/Inner")]
    server_inner = by_kind[(SpanKind.SERVER, f"/{SERVICE}/Inner")]
    trace_id = client_outer.context.trace_id
    assert {span.context.trace_id for span in finished} == {trace_id}

    def parent(span: ReadableSpan) -> int | None:
        return span.parent.span_id if span.parent is not None else None

    assert parent(client_outer) is None
    assert parent(server_outer) == client_outer.context.span_id
    assert parent(client_inner) == server_outer.context.span_id
    assert parent(server_inner) == client_inner.context.span_id
    # An event written in Inner would carry Inner's span as its parent.
    assert seen["inner"]["traceparent"].startswith(f"00-{trace_id:032x}-{server_inner.context.span_id:016x}-")
    # The interceptor's line of each RPC carries the trace and its own server span.
    rpc_lines = {line["method"]: line for line in log_lines if line["message"] == "rpc"}
    for method, span in ((f"/{SERVICE}/Outer", server_outer), (f"/{SERVICE}/Inner", server_inner)):
        assert rpc_lines[method]["trace_id"] == f"{trace_id:032x}"
        assert rpc_lines[method]["span_id"] == f"{span.context.span_id:016x}"


async def test_off_a_callers_traceparent_is_passed_through(
        echo_server: tuple[str, dict[str, dict[str, str]]], log_lines: list[dict[str, Any]]) -> None:
    assert not tracing.enabled()
    address, seen = echo_server
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    async with grpc.aio.insecure_channel(address) as channel:
        await _stub(channel, "Inner")(StringValue(value="x"), timeout=5,
                                      metadata=[("traceparent", f"00-{trace_id}-{span_id}-01")])
    [line] = [line for line in log_lines if line["message"] == "rpc"]
    assert line["trace_id"] == trace_id and "span_id" not in line  # no span of its own: tracing is off
    assert seen["inner"]["traceparent"] == f"00-{trace_id}-{span_id}-01"
    # Without a traceparent, no trace id at all.
    log_lines.clear()
    async with grpc.aio.insecure_channel(address) as channel:
        await _stub(channel, "Inner")(StringValue(value="x"), timeout=5)
    [line] = [line for line in log_lines if line["message"] == "rpc"]
    assert "trace_id" not in line and seen["inner"] == {}


async def _consume_one(settings: Settings, headers: list[tuple[str, bytes]]) -> tuple[str, str]:
    """Publish one MoneyMoved with headers to a topic of its own and consume it with the bank's
    EventConsumer; the (trace_id, span_id) its handler ran in."""
    group = f"test-trace-{uuid.uuid4().hex[:8]}"
    async with scratch_topic(settings, "test.trace") as topic:
        await publish(settings, topic, events_pb2.MoneyMoved(event_id="trace-1", transfer_id="t-1"), key=b"t-1",
                      headers=headers)
        ids: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()

        async def handler(message: Message, meta: EventMeta) -> str:
            ids.set_result(tracing.current_ids())
            return "applied"

        routes = {events_pb2.MoneyMoved.DESCRIPTOR.full_name: Route(events_pb2.MoneyMoved, handler)}
        consumer = EventConsumer(settings, group_id=group, topics=[topic], routes=routes, event_worst_case_s=1.0)
        await consumer.start()
        try:
            return await asyncio.wait_for(ids, 30)
        finally:
            await consumer.stop()


async def test_a_consumers_span_joins_the_trace_of_the_events_traceparent(
        settings: Settings, spans: InMemorySpanExporter) -> None:
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    seen_trace, seen_span = await _consume_one(settings, [("traceparent", f"00-{trace_id}-{parent_id}-01".encode())])
    [span] = [s for s in spans.get_finished_spans() if s.kind is SpanKind.CONSUMER]
    assert seen_trace == trace_id == f"{span.context.trace_id:032x}"
    assert seen_span == f"{span.context.span_id:016x}"
    assert span.parent is not None and f"{span.parent.span_id:016x}" == parent_id
    assert span.attributes is not None and span.attributes["messaging.system"] == "kafka"


async def test_off_a_consumer_passes_the_events_traceparent_through(settings: Settings) -> None:
    assert not tracing.enabled()
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    seen = await _consume_one(settings, [("traceparent", f"00-{trace_id}-{parent_id}-01".encode())])
    assert seen == (trace_id, "")


def test_json_lines_outside_a_trace_have_no_trace_id() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("svc_test"))
    logger = logging.getLogger("test_tracing_plain")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("plain")
    finally:
        logger.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert line["message"] == "plain" and "trace_id" not in line


def test_spans_reach_an_otlp_collector() -> None:
    """The real exporter path (BANK_OTEL_ENDPOINT): a minimal OTLP/gRPC trace receiver stands in
    for the collector; shutdown() flushes the batch processor into it."""
    from concurrent import futures

    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received: list[trace_service_pb2.ExportTraceServiceRequest] = []

    class Receiver(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
        def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,  # noqa: N802
                   context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
            received.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    collector = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), collector)  # type: ignore[no-untyped-call]
    port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()
    try:
        assert tracing.setup("svc_test", f"http://127.0.0.1:{port}")
        tracer = tracing._tracer  # noqa: SLF001  (the bank's own tracer, as the consumer uses it)
        assert tracer is not None
        with tracer.start_as_current_span("unit of work"):
            trace_id, _ = tracing.current_ids()
        tracing.shutdown()
    finally:
        tracing.shutdown()
        collector.stop(None)
    exported = [(resource.resource, span) for request in received for resource in request.resource_spans
                for scope in resource.scope_spans for span in scope.spans]
    assert [span.name for _, span in exported] == ["unit of work"]
    resource, span = exported[0]
    assert span.trace_id.hex() == trace_id
    assert {a.key: a.value.string_value for a in resource.attributes}["service.name"] == "svc_test"

"""The server interceptor chain every service uses: request id, structured log line, metrics,
the request's protovalidate rules (declared in proto/), and the mapping of domain errors (and
unexpected ones) to google.rpc.Status."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import protovalidate
from google.protobuf.message import Message

from common import auth, cassandra, db, input_guard, metrics, redisdb, tracing
from common.errors import DomainError, internal, not_implemented, storage_unavailable
from common.ids import REQUEST_ID_LENGTH_MAX
from common.logging import fields, request_id_var

log = logging.getLogger("rpc")

REQUEST_ID_HEADER = "x-request-id"
# Probes run every few seconds; logging each would drown the useful lines.
QUIET_SERVICES = ("grpc.health.v1.Health",)
# API.md's generic reason for a request that breaks a field rule.
INVALID_ARGUMENT = "INVALID_ARGUMENT"
# A rule whose id looks like an API.md reason (INVALID_AMOUNT, WEAK_PASSWORD, ...) names the
# reason its violation is reported with; protovalidate's own rule ids ("string.max_len") do not.
API_REASON = re.compile(r"^[A-Z][A-Z0-9_]*$")
# One validator per process: it compiles a message type's rules on first use (a few ms for the
# first type, well under one after) and keeps them, so a request costs a few microseconds.
VALIDATOR = protovalidate.Validator()

# A storage dependency that failed rather than refused: a lost or timed-out Postgres connection
# or statement, no free pooled connection, Redis or Cassandra unreachable or slow. UNAVAILABLE
# (503) tells the client to retry; INTERNAL (500) would say the bank itself is broken.
STORAGE_ERRORS: tuple[type[Exception], ...] = (*db.TRANSIENT_ERRORS, *redisdb.TRANSIENT_ERRORS,
                                               *cassandra.TRANSIENT_ERRORS)


def _field_path(violation: protovalidate.Violation) -> str:
    """The violating field as AIP-193 names it: "amount", "items[0].name", "labels[\"k\"]"."""
    path = violation.proto.field
    if path is None:  # a message-level rule: no single field to name
        return ""
    parts = []
    for element in path.elements:
        subscript = element.subscript
        parts.append(element.field_name if subscript is None else f"{element.field_name}[{json.dumps(subscript.value)}]")
    return ".".join(parts)


def check_rules(request: Message) -> None:
    """Raise INVALID_ARGUMENT with a BadRequest naming every field that breaks its proto rules.

    The reason is the first violation's when that rule names an API.md reason, else
    INVALID_ARGUMENT; the first is the lowest field number, the order the use cases checked in
    before the rules moved to the protos. A rule that does not compile is a programmer error
    and surfaces as INTERNAL.
    """
    violations = VALIDATOR.collect_violations(request)
    if not violations:
        return
    field_violations = [(_field_path(violation), violation.proto.message) for violation in violations]
    first_rule = violations[0].proto.rule_id
    reason = first_rule if API_REASON.match(first_rule) else INVALID_ARGUMENT
    message = "; ".join(f"{field}: {description}" for field, description in field_violations)
    raise DomainError(grpc.StatusCode.INVALID_ARGUMENT, reason, message, field_violations=field_violations)


def _request_headers(context: grpc.aio.ServicerContext) -> tuple[str, str | None]:
    """The request id (the caller's, else a new one) and the caller's W3C traceparent, if any."""
    request_id, traceparent = None, None
    for key, value in context.invocation_metadata() or ():
        if (key == REQUEST_ID_HEADER and request_id is None and isinstance(value, str)
                and 0 < len(value) <= REQUEST_ID_LENGTH_MAX):
            request_id = value
        elif key == tracing.TRACEPARENT_HEADER and isinstance(value, str):
            traceparent = value
    return request_id or str(uuid.uuid4()), traceparent


class ServerInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator: auth.Authenticator) -> None:
        self._authenticator = authenticator
        # The wrapped handler of each method, made on its first call: gRPC asks for a handler on
        # every call, and building one (closures, a method handler) each time is wasted work.
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        full_method = handler_call_details.method  # "/package.Service/Method"
        wrapped = self._wrapped.get(full_method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        # Only unary-unary RPCs are part of the bank's API; reflection (streaming) passes through.
        if handler is None or handler.unary_unary is None:
            return handler
        wrapped = self._wrap(full_method, handler)
        self._wrapped[full_method] = wrapped  # bounded: one entry per method the server has
        return wrapped

    def _wrap(self, full_method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        service, _, method = full_method.lstrip("/").rpartition("/")
        inner = handler.unary_unary
        quiet = service in QUIET_SERVICES
        authenticator = self._authenticator
        started_total = metrics.RPC_STARTED.labels(service, method)
        latency = metrics.RPC_LATENCY.labels(service, method)

        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            request_id, traceparent = _request_headers(context)
            token = request_id_var.set(request_id)
            trace_token = tracing.continue_remote(traceparent)
            caller_token = auth.set_current(None)
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            reason = ""
            caller: auth.Caller | None = None
            started_total.inc()
            try:
                caller = await authenticator.authenticate(full_method, context.invocation_metadata() or ())
                auth.set_current(caller)
                input_guard.check(request)
                # After authentication: a caller without a valid token learns nothing about input.
                check_rules(request)
                return await inner(request, context)
            except DomainError as exc:
                code, reason = exc.code, exc.reason
                await context.abort_with_status(exc.to_status())
            except NotImplementedError:
                error = not_implemented(full_method)
                code, reason = error.code, error.reason
                await context.abort_with_status(error.to_status())
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN  # type: ignore[assignment]
                raise
            except STORAGE_ERRORS as exc:
                log.warning("storage unavailable in %s", full_method, exc_info=exc)
                error = storage_unavailable()
                code, reason = error.code, error.reason
                await context.abort_with_status(error.to_status())
            except Exception:
                log.exception("unhandled error in %s", full_method)
                error = internal()
                code, reason = error.code, error.reason
                await context.abort_with_status(error.to_status())
            finally:
                elapsed = time.perf_counter() - started
                metrics.RPC_HANDLED.labels(service, method, code.name).inc()
                latency.observe(elapsed)
                if not quiet or code != grpc.StatusCode.OK:
                    log.info(
                        "rpc",
                        extra=fields(method=full_method, grpc_code=code.name, reason=reason or None,
                                     duration_ms=round(elapsed * 1000, 2),
                                     caller=f"{caller.role.value}:{caller.subject}" if caller else None),
                    )
                auth.reset_current(caller_token)
                tracing.detach(trace_token)
                request_id_var.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            wrapper,
            request_deserializer=input_guard.tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

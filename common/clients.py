"""Channels for internal RPCs between services (never through Envoy): each call carries the
service token, a deadline, and the request id of the RPC that caused it."""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import TypeVar

import grpc

from common import auth, tracing
from common.errors import DomainError, dependency_unavailable, error_info, internal, status_of
from common.logging import request_id_var

T = TypeVar("T")

# The deadline of every internal RPC: well under Envoy's route timeout (10 s), so the public
# call that caused it can still answer with the dependency's error.
INTERNAL_TIMEOUT_S = 3.0


class InternalChannel:
    def __init__(self, address: str, keys: auth.KeyRing, service: str) -> None:
        self.channel = grpc.aio.insecure_channel(
            # round_robin: a name that resolves to several pods (a headless Service, deploy/k8s)
            # gets its calls spread over all of them; one address behaves as before.
            # Reconnect backoff capped at a second (gRPC's default grows to 120 s): a dependency
            # that restarts is called again within a second of being back, instead of every
            # call failing DEPENDENCY_UNAVAILABLE for as long as the last backoff lasts.
            address, options=[("grpc.keepalive_time_ms", 30_000), ("grpc.enable_retries", 1),
                              ("grpc.lb_policy_name", "round_robin"), ("grpc.initial_reconnect_backoff_ms", 200),
                              ("grpc.min_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1_000)],
            interceptors=tracing.client_interceptors(),  # none when tracing is off
        )
        self._metadata = auth.service_metadata(keys, service)

    def metadata(self) -> Sequence[tuple[str, str]]:
        request_id = request_id_var.get()
        return [*self._metadata, ("x-request-id", request_id)] if request_id else list(self._metadata)

    async def close(self) -> None:
        await self.channel.close()


async def call(rpc: Awaitable[T]) -> T:
    """Await an internal RPC; its failure becomes a DomainError with the same code and reason, so
    the public caller sees e.g. ACCOUNT_NOT_EMPTY from the ledger, not an opaque INTERNAL."""
    try:
        return await rpc
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise dependency_unavailable() from exc
        status = status_of(exc)
        info = error_info(status) if status is not None else None
        if info is None:
            raise internal() from exc
        raise DomainError(code, info.reason, exc.details() or info.reason, dict(info.metadata)) from exc

"""The one mapping from domain errors to gRPC statuses.

Use cases raise DomainError with a gRPC code and a stable reason from ../shared/API.md; the
interceptor turns it into a google.rpc.Status carrying an ErrorInfo (domain "simplebank"), for
invalid fields a BadRequest, and for a call worth retrying later (a rate limit) a RetryInfo.
Envoy renders that status as JSON with the matching HTTP code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DetailT = TypeVar("DetailT", error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo)

DOMAIN = "simplebank"


class DomainError(Exception):
    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[tuple[str, str]] = (),
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})
        self.field_violations = list(field_violations)
        # When the same call may succeed again (a rate limit): a google.rpc.RetryInfo detail.
        self.retry_after_s = retry_after_s

    def to_status(self) -> grpc.Status:
        details = []
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata))
        details.append(info)
        if self.field_violations:
            bad = any_pb2.Any()
            bad.Pack(error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in self.field_violations
            ]))
            details.append(bad)
        if self.retry_after_s is not None:
            retry = any_pb2.Any()
            delay = duration_pb2.Duration()
            delay.FromMilliseconds(max(1, math.ceil(self.retry_after_s * 1000)))
            retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
            details.append(retry)
        proto = status_pb2.Status(code=self.code.value[0], message=self.message, details=details)
        return rpc_status.to_status(proto)


def not_implemented(method: str) -> DomainError:
    return DomainError(grpc.StatusCode.UNIMPLEMENTED, "NOT_IMPLEMENTED", f"{method} is not implemented yet")


def storage_unavailable() -> DomainError:
    # A dependency failed (a lost connection, a timeout): worth a retry, unlike INTERNAL.
    return DomainError(grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE",
                       "the bank cannot reach its storage right now; retry shortly")


def internal() -> DomainError:
    # Never a stack trace or an internal detail to the caller: the log has those.
    return DomainError(grpc.StatusCode.INTERNAL, "INTERNAL", "internal error; the request id is in the logs")


def status_of(error: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status a failed call carried in its trailers, if any."""
    for key, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None


def reason_of(error: grpc.RpcError) -> str | None:
    """The ErrorInfo reason of a failed call, if any."""
    status = status_of(error)
    info = error_info(status) if status is not None else None
    return info.reason if info is not None else None


def _detail(status: status_pb2.Status, kind: type[DetailT]) -> DetailT | None:
    """The first detail of this kind in a google.rpc.Status, if any."""
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            found = kind()
            detail.Unpack(found)
            return found
    return None


def error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo detail of a google.rpc.Status, if any (used by clients and tests)."""
    return _detail(status, error_details_pb2.ErrorInfo)


def retry_info(status: status_pb2.Status) -> error_details_pb2.RetryInfo | None:
    """The RetryInfo detail of a google.rpc.Status, if any (how long a rate-limited caller waits)."""
    return _detail(status, error_details_pb2.RetryInfo)

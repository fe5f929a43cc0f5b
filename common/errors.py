"""The one mapping from domain errors to gRPC statuses.

Use cases raise a DomainError by its stable reason from ../shared/API.md (`refused(reason,
message)`), never by a gRPC code: CODES below gives each reason its code (docs/decisions/0005
and 0018), and the interceptor turns the error into a google.rpc.Status carrying an ErrorInfo
(domain "simplebank"), for invalid fields a BadRequest, and for a call worth retrying later (a
rate limit) a RetryInfo. Envoy renders that status as JSON with the matching HTTP code.
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

_C = grpc.StatusCode
# Each reason's gRPC code, the one table (docs/decisions/0005): wrong whatever the state is
# INVALID_ARGUMENT, refused in the current state FAILED_PRECONDITION, a conflict ALREADY_EXISTS;
# worth a retry UNAVAILABLE. A reason missing here is a programmer error: refused() asserts.
CODES: dict[str, grpc.StatusCode] = {
    **dict.fromkeys(("INVALID_ARGUMENT", "INVALID_AMOUNT", "SAME_ACCOUNT", "UNSUPPORTED_CURRENCY", "INVALID_CODE",
                     "WEAK_PASSWORD", "INVALID_PAGE_SIZE", "INVALID_PAGE_TOKEN"), _C.INVALID_ARGUMENT),
    **dict.fromkeys(("CURRENCY_MISMATCH", "INSUFFICIENT_FUNDS", "ACCOUNT_INACTIVE", "ACCOUNT_NOT_EMPTY",
                     "EMAIL_NOT_VERIFIED", "CODE_EXPIRED", "ALREADY_VERIFIED", "NO_EMAIL_CHANGE",
                     "TRANSFER_NOT_PENDING", "HOLD_EXPIRED", "NOT_PAYEE", "EXCEEDS_HELD_AMOUNT"),
                    _C.FAILED_PRECONDITION),
    **dict.fromkeys(("ACCOUNT_NOT_FOUND", "TRANSFER_NOT_FOUND", "CUSTOMER_NOT_FOUND", "SESSION_NOT_FOUND"),
                    _C.NOT_FOUND),
    **dict.fromkeys(("IDEMPOTENCY_KEY_REUSED", "ACCOUNT_ALREADY_EXISTS", "EMAIL_TAKEN", "USERNAME_TAKEN",
                     "CREDENTIAL_EXISTS"), _C.ALREADY_EXISTS),
    **dict.fromkeys(("CUSTOMER_ONLY", "TELLER_ONLY", "SERVICE_ONLY"), _C.PERMISSION_DENIED),
    **dict.fromkeys(("UNAUTHENTICATED", "INVALID_TOKEN", "TOKEN_EXPIRED", "SESSION_REVOKED", "SESSION_EXPIRED",
                     "BAD_CREDENTIALS", "INVALID_ENROLLMENT_TOKEN", "INVALID_REFRESH_TOKEN"), _C.UNAUTHENTICATED),
    **dict.fromkeys(("LEDGER_BUSY", "STORAGE_UNAVAILABLE", "DEPENDENCY_UNAVAILABLE", "ACTIVITY_UNAVAILABLE",
                     "AUTH_UNAVAILABLE", "NOTIFICATIONS_UNAVAILABLE"), _C.UNAVAILABLE),
    **dict.fromkeys(("RATE_LIMITED", "TOO_MANY_ATTEMPTS"), _C.RESOURCE_EXHAUSTED),
    "NOT_IMPLEMENTED": _C.UNIMPLEMENTED,
    "INTERNAL": _C.INTERNAL,
}


class DomainError(Exception):
    """A refusal or failure the caller is told about, by reason. `code` None: the reason's code
    in CODES (what refused() makes); a code is passed only where the status comes from
    elsewhere: an internal call's, passed through by common/clients.py, and a proto rule's
    (common/interceptors.check_rules: always INVALID_ARGUMENT, whatever reason the rule names)."""

    def __init__(
        self,
        code: grpc.StatusCode | None,
        reason: str,
        message: str,
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[tuple[str, str]] = (),
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = CODES[reason] if code is None else code
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


def refused(reason: str, message: str, *, metadata: Mapping[str, str] | None = None,
            field_violations: Sequence[tuple[str, str]] = (), retry_after_s: float | None = None) -> DomainError:
    """The error a use case raises: by reason, its code from CODES."""
    assert reason in CODES, f"{reason} has no gRPC code in common/errors.CODES"
    return DomainError(None, reason, message, metadata, field_violations, retry_after_s)


def invalid(field: str, description: str) -> DomainError:
    """INVALID_ARGUMENT naming the one field that breaks a rule (its BadRequest violation)."""
    return refused("INVALID_ARGUMENT", f"{field}: {description}", field_violations=[(field, description)])


def not_implemented(method: str) -> DomainError:
    return refused("NOT_IMPLEMENTED", f"{method} is not implemented yet")


def storage_unavailable() -> DomainError:
    # A dependency failed (a lost connection, a timeout): worth a retry, unlike INTERNAL.
    return refused("STORAGE_UNAVAILABLE", "the bank cannot reach its storage right now; retry shortly")


def dependency_unavailable() -> DomainError:
    # Another service of the bank did not answer in time: worth a retry, unlike INTERNAL.
    return refused("DEPENDENCY_UNAVAILABLE", "a service the bank depends on is unavailable; retry")


def internal() -> DomainError:
    # Never a stack trace or an internal detail to the caller: the log has those.
    return refused("INTERNAL", "internal error; the request id is in the logs")


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

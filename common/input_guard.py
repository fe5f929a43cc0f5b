"""Checks every request gets before its field rules and its use case (common/interceptors.py):
bytes that are no message at all, and text that the database cannot store.

Both used to surface as server errors, found by fuzzing the REST API (tests/test_fuzz.py):
- a string that is not UTF-8 (Envoy's transcoder passes percent-encoded bytes of a path or query
  parameter through as they are) fails protobuf decoding inside gRPC, before any handler, which
  answered UNKNOWN (HTTP 500);
- a NUL character, valid in JSON and protobuf, is refused by PostgreSQL's text type, which
  answered INTERNAL (HTTP 500) from whichever store wrote it.
No field of the bank's API has a use for either, so both are INVALID_ARGUMENT, like a field rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from common.errors import refused

# API.md's generic reason for a request that breaks a field rule.
REASON = "INVALID_ARGUMENT"


class Undecodable:
    """What the tolerant deserializer hands the interceptor instead of a message."""

    def __init__(self, error: DecodeError) -> None:
        self.error = error


def tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A request deserializer that returns Undecodable instead of raising, so the interceptor
    can answer INVALID_ARGUMENT (gRPC itself would answer UNKNOWN)."""
    if deserialize is None:
        return None
    inner = deserialize

    def deserializer(data: bytes) -> Any:
        try:
            return inner(data)
        except DecodeError as exc:
            return Undecodable(exc)

    return deserializer


def check(request: Any) -> None:
    """Raise INVALID_ARGUMENT for an undecodable request or a string field holding NUL."""
    if isinstance(request, Undecodable):
        raise refused(REASON, "the request is not a valid message: text must be UTF-8")
    if not isinstance(request, Message):
        return
    fields = sorted(set(_fields_with_nul(request, "")))
    if fields:
        violations = [(field, "must not contain NUL characters") for field in fields]
        raise refused(REASON, "; ".join(f"{field}: {description}" for field, description in violations),
                      field_violations=violations)


def _fields_with_nul(message: Message, prefix: str) -> Iterator[str]:
    for field, value in message.ListFields():
        name = prefix + field.name
        repeated = field.is_repeated
        if field.type == FieldDescriptor.TYPE_STRING:
            if any("\x00" in text for text in (value if repeated else [value])):
                yield name
        # Maps are left out: no request has one.
        elif field.type == FieldDescriptor.TYPE_MESSAGE and not _is_map(field):
            for index, item in enumerate(value if repeated else [value]):
                yield from _fields_with_nul(item, f"{name}[{index}]." if repeated else f"{name}.")


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry

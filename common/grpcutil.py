"""Small helpers for generated code: servicer names, Timestamp values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import ModuleType

from google.protobuf.timestamp_pb2 import Timestamp

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def service_name(pb2: ModuleType, service: str) -> str:
    """The full name of a service declared in a generated *_pb2 module, e.g. bank.auth.v1.AuthService."""
    return str(pb2.DESCRIPTOR.services_by_name[service].full_name)


def timestamp(value: datetime) -> Timestamp:
    """An aware datetime as a Timestamp, to the microsecond. By hand: Timestamp.FromDatetime goes
    through a time tuple, several times slower, and this runs per response and per event."""
    micros = (value - EPOCH) // timedelta(microseconds=1)
    return Timestamp(seconds=micros // 1_000_000, nanos=micros % 1_000_000 * 1000)

"""Small helpers for registering generated servicers."""

from __future__ import annotations

from types import ModuleType


def service_name(pb2: ModuleType, service: str) -> str:
    """The full name of a service declared in a generated *_pb2 module, e.g. bank.auth.v1.AuthService."""
    return str(pb2.DESCRIPTOR.services_by_name[service].full_name)

"""Who is calling: the caller of the RPC being handled (set by the interceptor), its role, and
the access level each RPC declares."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any

from common.errors import DomainError, refused


class Role(StrEnum):
    CUSTOMER = "customer"
    TELLER = "teller"
    SERVICE = "service"


class Access(Enum):
    PUBLIC = "public"  # no token needed (registration, login)
    AUTHENTICATED = "authenticated"  # a customer or a teller
    TELLER = "teller"  # tellers only
    INTERNAL = "internal"  # other services only (service token)


@dataclass(frozen=True)
class Caller:
    subject: str  # customer id for customers, credential id for tellers, service name for services
    role: Role
    session_id: str | None = None

    @property
    def customer_id(self) -> str | None:
        return self.subject if self.role is Role.CUSTOMER else None

    @property
    def is_teller(self) -> bool:
        return self.role is Role.TELLER


_caller: ContextVar[Caller | None] = ContextVar("caller", default=None)


def current() -> Caller:
    """The authenticated caller of the RPC being handled."""
    caller = _caller.get()
    if caller is None:  # a handler of a PUBLIC RPC asked for a caller: a programming error
        raise RuntimeError("no authenticated caller in this context")
    return caller


def set_current(caller: Caller | None) -> Any:
    return _caller.set(caller)


def reset_current(token: Any) -> None:
    _caller.reset(token)


def unauthenticated(reason: str, message: str) -> DomainError:
    return refused(reason, message)

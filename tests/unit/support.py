"""What the use-case tests share: the domain error a use case must raise, and svc_customer's
journey against the fakes (register -> verify -> credentials -> log in), each step a call."""

from __future__ import annotations

from datetime import timedelta

import pytest
from bank.events.v1 import events_pb2

from common.errors import DomainError
from svc_customer import service
from tests.unit.conftest import CustomerWorld

PASSWORD = "correct horse battery"
ADDRESS = "203.0.113.7"  # a client address the limits count (127.0.0.1 is exempt)
REFRESH_TTL = timedelta(days=30)


async def refusal(call: object) -> DomainError:
    with pytest.raises(DomainError) as raised:
        await call  # type: ignore[misc]
    return raised.value


def last_code(w: CustomerWorld) -> str:
    """The code of the newest registration's email (it travels in the event, to svc_notify)."""
    return w.store.events(events_pb2.CustomerRegistered)[-1].verification_code


def wrong(code: str) -> str:
    return f"{(int(code) + 1) % 1_000_000:06d}"


async def registered(w: CustomerWorld, email: str = "ada@example.com") -> tuple[str, str]:
    customer = await service.register_customer(w.store, w.codes, email, "Ada Lovelace", "")
    return str(customer.customer_id), last_code(w)


async def enrolled(w: CustomerWorld, email: str = "ada@example.com") -> str:
    customer_id, code = await registered(w, email)
    _, token = await service.verify_email(w.store, w.codes, w.throttle, customer_id, code, ADDRESS)
    return token


async def onboarded(w: CustomerWorld, email: str = "ada@example.com", username: str = "ada") -> str:
    customer_id, _ = await service.create_credential(w.store, w.passwords, await enrolled(w, email), username,
                                                     PASSWORD)
    return customer_id


async def log_in(w: CustomerWorld, username: str = "ada", password: str = PASSWORD,
                 address: str = ADDRESS) -> service.IssuedSession:
    return await service.login(w.store, w.passwords, w.throttle, w.issuer, username, password, address,
                               refresh_ttl=REFRESH_TTL)

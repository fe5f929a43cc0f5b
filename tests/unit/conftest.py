"""The fast tier: use cases against in-memory fakes of their stores (tests/unit/fakes.py).
Nothing here starts or needs the stack (`make test-unit`, a few seconds); `make test` runs
these too, with the stack tests."""

from __future__ import annotations

import dataclasses

import pyseto
import pytest
from argon2 import PasswordHasher
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from common import auth, ratelimit
from svc_customer import service
from tests.unit.fakes import (
    FakeAccounts,
    FakeActivityStore,
    FakeCustomers,
    FakeCustomerStore,
    FakeLedger,
    FakeLedgerClient,
    FakeLimiter,
    FakeRevocations,
)


@pytest.fixture
def ledger() -> FakeLedger:
    return FakeLedger()


@pytest.fixture
def activity() -> FakeActivityStore:
    return FakeActivityStore()


@pytest.fixture
def accounts() -> FakeAccounts:
    return FakeAccounts()


@pytest.fixture
def ledger_client(ledger: FakeLedger) -> FakeLedgerClient:
    return FakeLedgerClient(ledger)


@pytest.fixture
def customers() -> FakeCustomers:
    return FakeCustomers()


# --- svc_customer: its store, Redis (limits, revocations) and what register() builds ------------

@dataclasses.dataclass(frozen=True)
class CustomerWorld:
    """svc_customer's dependencies as server.register builds them, on fakes: the store, the
    limits and revocations (Redis), a real token issuer with a key made for the test, and a
    cheap argon2id (the rules are the same; the cost is the real one's business)."""

    store: FakeCustomerStore
    limiter: FakeLimiter
    throttle: service.Throttle
    revocations: FakeRevocations
    codes: service.Codes
    passwords: service.Passwords
    issuer: auth.TokenIssuer
    verifier: auth.TokenVerifier


# API.md's limits, small where a test runs into them.
LOGIN_FAILURES_PER_USERNAME_AND_ADDRESS_MAX = 5
VERIFY_FAILURES_PER_ADDRESS_MAX = 8
CHEAP_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


@pytest.fixture(scope="session")
def key_ring() -> auth.KeyRing:
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    public = private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    return auth.KeyRing(signing_key=pyseto.Key.new(4, "public", pem), signing_kid="unit",
                        verify_keys={"unit": pyseto.Key.new(4, "public", public)}, service_token="unit-service-token")


@pytest.fixture
def world(key_ring: auth.KeyRing) -> CustomerWorld:
    limiter = FakeLimiter()
    throttle = service.Throttle(
        limiter,
        login_by_username_and_address=ratelimit.Limit("login_failures_by_username_and_address",
                                                      LOGIN_FAILURES_PER_USERNAME_AND_ADDRESS_MAX, 900),
        login_by_username=ratelimit.Limit("login_failures_by_username", service.USERNAME_FAILURES_MAX,
                                          service.USERNAME_FAILURES_WINDOW_S),
        login_by_address=ratelimit.Limit("login_failures_by_address", 100, 900),
        verify_by_address=ratelimit.Limit("verify_failures_by_address", VERIFY_FAILURES_PER_ADDRESS_MAX, 900),
        exempt=ratelimit.parse_networks("127.0.0.1"))
    return CustomerWorld(FakeCustomerStore(), limiter, throttle, FakeRevocations(),
                         service.Codes(key_ring.service_token), service.Passwords(hasher=CHEAP_HASHER),
                         auth.TokenIssuer(key_ring, 900), auth.TokenVerifier(key_ring))

"""The fast tier: use cases against in-memory fakes of their stores (tests/unit/fakes.py).
Nothing here starts or needs the stack (`make test-unit`, a few seconds); `make test` runs
these too, with the stack tests."""

from __future__ import annotations

import pytest

from tests.unit.fakes import FakeAccounts, FakeActivityStore, FakeCustomers, FakeLedger, FakeLedgerClient


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

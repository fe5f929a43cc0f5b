"""In-memory fakes of the stores, for the use cases' unit tests (cosmicpython's FakeRepository
and FakeUnitOfWork are the model): the same methods as the real adapter, plain dicts behind.

A fake keeps the rules a use case relies on the store for (the ledger's refusals, idempotent
request ids, newest-first pages) in their simplest form; the real SQL and CQL, and their
behaviour under concurrency and faults, are tested against the stack (tests/test_*.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from uuid import UUID

import grpc
from cassandra import OperationTimedOut

from common.currencies import SUPPORTED_CURRENCIES
from common.errors import DomainError, dependency_unavailable
from svc_account.clients import LedgerState
from svc_account.store import Account, Activity
from svc_transfer import service as ledger_service
from svc_transfer.store import (
    AccountChange,
    LedgerAccount,
    LedgerBusy,
    Movement,
    MovementRequest,
    Transfer,
    VisibleTransfer,
)

INT64_MAX = 2**63 - 1
START = datetime(2026, 1, 1, tzinfo=UTC)


class FakeLedger:
    """svc_transfer's store.LedgerStore and batching.MovementBatcher in one: accounts, cash
    accounts per supported currency, movements with the refusals of migrations/0005."""

    def __init__(self) -> None:
        self.accounts: dict[str, LedgerAccount] = {}
        self.cash = {currency: str(uuid.uuid4()) for currency in sorted(SUPPORTED_CURRENCIES)}
        self.transfers: list[Transfer] = []
        self.by_request: dict[tuple[str, str], tuple[MovementRequest, Transfer]] = {}
        self.busy = False  # True: every call fails as the real store does when Postgres is down
        self._clock = START

    def _tick(self) -> datetime:
        self._clock += timedelta(milliseconds=1)
        return self._clock

    def _check_busy(self) -> None:
        if self.busy:
            raise LedgerBusy("the fake ledger is busy")

    def balance(self, account_id: str) -> int:
        return self.accounts[account_id].balance

    # --- Movements --------------------------------------------------------------------------

    async def move(self, request: MovementRequest) -> Movement:
        self._check_busy()
        key = (request.initiator, request.request_id)
        if key in self.by_request:
            first, transfer = self.by_request[key]
            if dataclasses.replace(first, event_headers={}) != dataclasses.replace(request, event_headers={}):
                return Movement("IDEMPOTENCY_KEY_REUSED", False, None)
            return Movement(None, True, transfer)
        cash = self.cash.get(request.currency)
        if cash is None:
            return Movement("UNSUPPORTED_CURRENCY", False, None)
        source_id = request.from_account_id or cash
        target_id = request.to_account_id or cash
        source, target = self.accounts.get(source_id), self.accounts.get(target_id)
        if source_id == cash:
            source = LedgerAccount(cash, "", request.currency, "ACTIVE", 0, START)
        if target_id == cash:
            target = LedgerAccount(cash, "", request.currency, "ACTIVE", 0, START)
        if source is None or target is None or (request.owner_id is not None and source.customer_id != request.owner_id):
            return Movement("ACCOUNT_NOT_FOUND", False, None)
        if source.currency != request.currency or target.currency != request.currency:
            return Movement("CURRENCY_MISMATCH", False, None)
        if source.status != "ACTIVE" or target.status != "ACTIVE":
            return Movement("ACCOUNT_INACTIVE", False, None)
        if source_id != cash and source.balance < request.amount:
            return Movement("INSUFFICIENT_FUNDS", False, None)
        if target_id != cash and target.balance > INT64_MAX - request.amount:
            return Movement("INVALID_AMOUNT", False, None)
        if source_id != cash:
            self.accounts[source_id] = dataclasses.replace(source, balance=source.balance - request.amount)
        if target_id != cash:
            self.accounts[target_id] = dataclasses.replace(target, balance=target.balance + request.amount)
        transfer = Transfer(str(uuid.uuid4()), request.kind, request.request_id, source_id, target_id, request.amount,
                            request.currency, request.description, self._tick())
        self.transfers.append(transfer)
        self.by_request[key] = (request, transfer)
        return Movement(None, False, transfer)

    # --- Ledger -----------------------------------------------------------------------------

    async def open_ledger_account(self, account_id: str, customer_id: str, currency: str) -> AccountChange:
        self._check_busy()
        if currency not in self.cash:
            return AccountChange("UNSUPPORTED_CURRENCY", None)
        existing = self.accounts.get(account_id)
        if existing is not None:
            if (existing.customer_id, existing.currency) != (customer_id, currency):
                return AccountChange("ACCOUNT_ALREADY_EXISTS", None)
            return AccountChange(None, existing)
        account = LedgerAccount(account_id, customer_id, currency, "ACTIVE", 0, self._tick())
        self.accounts[account_id] = account
        return AccountChange(None, account)

    async def set_ledger_account_status(self, account_id: str, status: str) -> AccountChange:
        self._check_busy()
        account = self.accounts.get(account_id)
        if account is None:
            return AccountChange("ACCOUNT_NOT_FOUND", None)
        if account.status == "CLOSED" and status != "CLOSED":
            return AccountChange("ACCOUNT_INACTIVE", None)
        if status == "CLOSED" and account.balance != 0:
            return AccountChange("ACCOUNT_NOT_EMPTY", None)
        self.accounts[account_id] = dataclasses.replace(account, status=status)
        return AccountChange(None, self.accounts[account_id])

    async def customer_accounts(self, account_ids: Sequence[str]) -> dict[str, LedgerAccount]:
        self._check_busy()
        return {a: self.accounts[a] for a in account_ids if a in self.accounts}

    async def visible_transfer(self, transfer_id: str) -> VisibleTransfer | None:
        self._check_busy()
        for transfer in self.transfers:
            if transfer.transfer_id == transfer_id:
                return VisibleTransfer(transfer, self._owner(transfer.from_account_id), self._owner(transfer.to_account_id))
        return None

    def _owner(self, account_id: str) -> str | None:
        account = self.accounts.get(account_id)
        return None if account is None else account.customer_id

    async def account_transfers(self, account_id: str, after: tuple[datetime, str] | None,
                                limit: int) -> list[Transfer]:
        self._check_busy()
        mine = [t for t in self.transfers if account_id in (t.from_account_id, t.to_account_id)]
        mine.sort(key=lambda t: (t.create_time, t.transfer_id), reverse=True)
        if after is not None:
            mine = [t for t in mine if (t.create_time, t.transfer_id) < after]
        return mine[:limit]


class FakeActivityStore:
    """svc_account's store.ActivityStore: statement lines by account and month."""

    def __init__(self) -> None:
        self.lines: dict[tuple[UUID, int, UUID], Activity] = {}
        self.months_of: dict[UUID, set[int]] = {}
        self.failures_to_come = 0  # the next writes that fail as Cassandra's timeouts do
        self.writes = 0

    async def put_activities(self, lines: list[Activity]) -> None:
        self.writes += 1
        if self.failures_to_come > 0:
            self.failures_to_come -= 1
            raise OperationTimedOut(errors={}, last_host="fake")  # the driver's own, as the real store raises it
        for line in lines:
            self.months_of.setdefault(line.account_id, set()).add(line.month)
            self.lines[(line.account_id, line.month, line.activity_id)] = line

    async def months(self, account_id: UUID, up_to: int | None, limit: int) -> list[int]:
        months = sorted(self.months_of.get(account_id, set()), reverse=True)
        return [m for m in months if up_to is None or m <= up_to][:limit]

    async def month_page(self, account_id: UUID, month: int, after: tuple[datetime, UUID] | None,
                         limit: int) -> list[Activity]:
        lines = [a for (account, m, _), a in self.lines.items() if account == account_id and m == month]
        lines.sort(key=lambda a: (a.create_time, a.activity_id), reverse=True)
        if after is not None:
            lines = [a for a in lines if (a.create_time, a.activity_id) < after]
        return lines[:limit]


class FakeAccounts:
    """svc_account's store.AccountStore: who owns which account."""

    def __init__(self) -> None:
        self.rows: dict[UUID, Account] = {}
        self._clock = START

    async def insert_account(self, account_id: UUID, customer_id: UUID, currency: str) -> Account:
        assert account_id not in self.rows, "account ids are new UUIDv7s"
        self._clock += timedelta(milliseconds=1)
        self.rows[account_id] = Account(account_id, customer_id, currency, "ACTIVE", self._clock)
        return self.rows[account_id]

    async def get_account(self, account_id: UUID) -> Account | None:
        return self.rows.get(account_id)

    async def list_accounts(self, customer_id: UUID, after: tuple[datetime, UUID] | None, limit: int) -> list[Account]:
        mine = sorted((a for a in self.rows.values() if a.customer_id == customer_id),
                      key=lambda a: (a.create_time, a.account_id), reverse=True)
        return [a for a in mine if after is None or (a.create_time, a.account_id) < after][:limit]

    async def set_status(self, account_id: UUID, status: str) -> None:
        self.rows[account_id] = dataclasses.replace(self.rows[account_id], status=status)


@contextlib.contextmanager
def _as_an_internal_call() -> Iterator[None]:
    """What common/clients.call makes of a refusal on the wire: the same reason, except that an
    unavailable service is DEPENDENCY_UNAVAILABLE to the caller."""
    try:
        yield
    except DomainError as exc:
        if exc.code is grpc.StatusCode.UNAVAILABLE:
            raise dependency_unavailable() from exc
        raise


class FakeLedgerClient:
    """svc_account's clients.LedgerClient, answered by svc_transfer's own use cases on a
    FakeLedger: the refusals a real call would pass through (ACCOUNT_NOT_EMPTY, ...) by reason."""

    def __init__(self, ledger: FakeLedger) -> None:
        self.ledger = ledger

    async def open_account(self, account_id: str, customer_id: str, currency: str) -> None:
        with _as_an_internal_call():
            await ledger_service.open_ledger_account(self.ledger, account_id=account_id, customer_id=customer_id,
                                                     currency=currency)

    async def set_status(self, account_id: str, status: str) -> LedgerState:
        with _as_an_internal_call():
            account = await ledger_service.set_ledger_account_status(self.ledger, account_id=account_id, status=status)
        return LedgerState(account.balance, account.status)

    async def states(self, account_ids: list[str]) -> dict[str, LedgerState]:
        with _as_an_internal_call():
            found = await ledger_service.batch_get_ledger_accounts(self.ledger, account_ids)
        return {a.account_id: LedgerState(a.balance, a.status) for a in found}


class FakeCustomers:
    """svc_account's clients.CustomerClient: which customers verified their email."""

    def __init__(self) -> None:
        self.verified: set[str] = set()

    async def email_verified(self, customer_id: str) -> bool:
        return customer_id in self.verified

"""In-memory fakes of the stores, for the use cases' unit tests (cosmicpython's FakeRepository
and FakeUnitOfWork are the model): the same methods as the real adapter, plain dicts behind.

A fake keeps the rules a use case relies on the store for (the ledger's refusals, idempotent
request ids, newest-first pages) in their simplest form; the real SQL and CQL, and their
behaviour under concurrency and faults, are tested against the stack (tests/test_*.py)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import TypeVar
from uuid import UUID

import grpc
from cassandra import OperationTimedOut
from google.protobuf.message import Message

from common import ratelimit
from common.currencies import SUPPORTED_CURRENCIES
from common.errors import DomainError, dependency_unavailable
from common.events import OutboxEvent
from svc_account.clients import LedgerState, ledger_state
from svc_account.store import Account, Activity
from svc_customer import store as customer_store
from svc_notify import store as notify_store
from svc_notify.mailer import Email
from svc_transfer import service as ledger_service
from svc_transfer.server import account_message
from svc_transfer.store import (
    AccountChange,
    LedgerAccount,
    LedgerBusy,
    Movement,
    MovementRequest,
    Transfer,
    VisibleTransfer,
)

M = TypeVar("M", bound=Message)

INT64_MAX = 2**63 - 1
START = datetime(2026, 1, 1, tzinfo=UTC)


class FakeLedger:
    """svc_transfer's store.LedgerStore and batching.MovementBatcher in one: accounts, cash
    accounts per supported currency, movements and holds with the refusals of migrations/0005
    and 0006 in their order. `advance(seconds)` moves its clock; `release_lapsed()` is the
    release worker."""

    def __init__(self) -> None:
        self.accounts: dict[str, LedgerAccount] = {}
        self.cash = {currency: str(uuid.uuid4()) for currency in sorted(SUPPORTED_CURRENCIES)}
        self.transfers: list[Transfer] = []
        self.by_request: dict[tuple[str, str], tuple[MovementRequest, Transfer]] = {}
        self.busy = False  # True: every call fails as the real store does when Postgres is down
        self.pending_credits: dict[str, int] = {}  # per account: its PENDING holds as payee
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

    def advance(self, seconds: float) -> None:
        self._clock += timedelta(seconds=seconds)

    def _replace(self, transfer: Transfer) -> None:
        at = next(i for i, t in enumerate(self.transfers) if t.transfer_id == transfer.transfer_id)
        self.transfers[at] = transfer

    def _reserve(self, hold: Transfer, sign: int) -> None:
        """Adds (sign 1) or takes off (-1) a hold's amount from its accounts' pending sums."""
        assert hold.held_amount is not None
        payer = self.accounts[hold.from_account_id]
        self.accounts[payer.account_id] = dataclasses.replace(
            payer, pending_debits=payer.pending_debits + sign * hold.held_amount)
        self.pending_credits[hold.to_account_id] = self.pending_credits.get(hold.to_account_id, 0) + sign * hold.held_amount

    async def move(self, request: MovementRequest) -> Movement:
        self._check_busy()
        key = (request.initiator, request.request_id)
        if key in self.by_request:
            first, transfer = self.by_request[key]
            if dataclasses.replace(first, event_headers={}) != dataclasses.replace(request, event_headers={}):
                return Movement("IDEMPOTENCY_KEY_REUSED", False, None)
            return Movement(None, True, transfer)
        if request.kind in ("POST", "VOID"):
            return self._settle(request)
        assert request.amount is not None
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
        if source_id != cash and source.available_balance < request.amount:
            return Movement("INSUFFICIENT_FUNDS", False, None)
        if target_id != cash and target.balance > INT64_MAX - request.amount:
            return Movement("INVALID_AMOUNT", False, None)
        now = self._tick()
        if request.hold_seconds is not None:  # a hold: reserved, nothing moves
            transfer = Transfer(str(uuid.uuid4()), request.kind, request.request_id, source_id, target_id,
                                request.amount, request.currency, request.description, now, "PENDING",
                                request.amount, now + timedelta(seconds=request.hold_seconds))
            self.transfers.append(transfer)
            self._reserve(transfer, 1)
            self.by_request[key] = (request, transfer)
            return Movement(None, False, transfer)
        if source_id != cash:
            self.accounts[source_id] = dataclasses.replace(source, balance=source.balance - request.amount)
        if target_id != cash:
            self.accounts[target_id] = dataclasses.replace(target, balance=target.balance + request.amount)
        transfer = Transfer(str(uuid.uuid4()), request.kind, request.request_id, source_id, target_id, request.amount,
                            request.currency, request.description, now)
        self.transfers.append(transfer)
        self.by_request[key] = (request, transfer)
        return Movement(None, False, transfer)

    def _settle(self, request: MovementRequest) -> Movement:
        """A POST or a VOID of a hold, with migrations/0006's rules in their order."""
        hold = next((t for t in self.transfers if t.transfer_id == request.hold_id), None)
        payer = None if hold is None else self._owner(hold.from_account_id)
        payee = None if hold is None else self._owner(hold.to_account_id)
        if hold is None or (request.owner_id is not None and request.owner_id not in (payer, payee)):
            return Movement("TRANSFER_NOT_FOUND", False, None)
        if request.owner_id is not None and request.owner_id != payee:
            return Movement("NOT_PAYEE", False, None)
        if hold.held_amount is None or hold.status in ("COMPLETED", "VOIDED"):
            return Movement("TRANSFER_NOT_PENDING", False, None, hold.status)
        assert hold.expire_time is not None
        now = self._tick()
        if hold.status == "EXPIRED" or now >= hold.expire_time:
            return Movement("HOLD_EXPIRED", False, None)
        amount = hold.held_amount
        if request.kind == "POST":
            amount = hold.held_amount if request.amount is None else request.amount
            if amount > hold.held_amount:
                return Movement("EXCEEDS_HELD_AMOUNT", False, None)
            source, target = self.accounts[hold.from_account_id], self.accounts[hold.to_account_id]
            if source.status != "ACTIVE" or target.status != "ACTIVE":
                return Movement("ACCOUNT_INACTIVE", False, None)
        self._reserve(hold, -1)
        if request.kind == "POST":
            source, target = self.accounts[hold.from_account_id], self.accounts[hold.to_account_id]
            self.accounts[source.account_id] = dataclasses.replace(source, balance=source.balance - amount)
            self.accounts[target.account_id] = dataclasses.replace(target, balance=target.balance + amount)
        settled = dataclasses.replace(hold, status="COMPLETED" if request.kind == "POST" else "VOIDED", amount=amount)
        self._replace(settled)
        self.by_request[(request.initiator, request.request_id)] = (request, settled)
        return Movement(None, False, settled)

    def release_lapsed(self) -> int:
        """The release worker: every lapsed PENDING hold becomes EXPIRED; returns how many."""
        lapsed = [t for t in self.transfers if t.status == "PENDING" and t.expire_time is not None
                  and self._clock >= t.expire_time]
        for hold in lapsed:
            self._reserve(hold, -1)
            self._replace(dataclasses.replace(hold, status="EXPIRED"))
        return len(lapsed)

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
        if status == "CLOSED" and (account.balance or account.pending_debits or self.pending_credits.get(account_id)):
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
    FakeLedger: the refusals a real call would pass through (ACCOUNT_NOT_EMPTY, ...) by reason,
    and its accounts as the wire carries them (svc_transfer's message, svc_account's reading)."""

    def __init__(self, ledger: FakeLedger) -> None:
        self.ledger = ledger

    async def open_account(self, account_id: str, customer_id: str, currency: str) -> None:
        with _as_an_internal_call():
            await ledger_service.open_ledger_account(self.ledger, account_id=account_id, customer_id=customer_id,
                                                     currency=currency)

    async def set_status(self, account_id: str, status: str) -> LedgerState:
        with _as_an_internal_call():
            account = await ledger_service.set_ledger_account_status(self.ledger, account_id=account_id, status=status)
        return ledger_state(account_message(account))

    async def states(self, account_ids: list[str]) -> dict[str, LedgerState]:
        with _as_an_internal_call():
            found = await ledger_service.batch_get_ledger_accounts(self.ledger, account_ids)
        return {a.account_id: ledger_state(account_message(a)) for a in found}


class FakeCustomers:
    """svc_account's clients.CustomerClient: which customers verified their email."""

    def __init__(self) -> None:
        self.verified: set[str] = set()

    async def email_verified(self, customer_id: str) -> bool:
        return customer_id in self.verified


# --- svc_customer -------------------------------------------------------------------------------

@dataclasses.dataclass
class _SessionRow:
    session_id: UUID
    credential_id: UUID
    subject: str
    role: str
    refresh_expire_time: datetime
    create_time: datetime
    revoked_time: datetime | None = None
    revoke_reason: str = ""


@dataclasses.dataclass
class _Tables:
    """svc_customer's tables (migrations/), as plain dicts keyed as their primary keys."""

    customers: dict[UUID, customer_store.Customer] = dataclasses.field(default_factory=dict)
    verification_codes: dict[UUID, customer_store.VerificationCode] = dataclasses.field(default_factory=dict)
    enrollment_tokens: dict[bytes, tuple[UUID, datetime, datetime | None]] = dataclasses.field(default_factory=dict)
    credentials: dict[UUID, customer_store.Credential] = dataclasses.field(default_factory=dict)
    sessions: dict[UUID, _SessionRow] = dataclasses.field(default_factory=dict)
    # token hash -> (session id, create time, rotated time)
    refresh_tokens: dict[bytes, tuple[UUID, datetime, datetime | None]] = dataclasses.field(default_factory=dict)
    # email -> (the pending code, its create time, its used time)
    password_resets: dict[str, tuple[customer_store.PendingCode, datetime, datetime | None]] = \
        dataclasses.field(default_factory=dict)
    email_changes: dict[UUID, customer_store.PendingCode] = dataclasses.field(default_factory=dict)
    outbox: list[Message] = dataclasses.field(default_factory=list)


class FakeCustomerTx:
    """svc_customer's store.Tx: the same methods, on the tables of a FakeCustomerStore. The locks
    of the real one (FOR UPDATE, the email's advisory lock) have nothing to guard here: the fake
    runs one use case step at a time."""

    def __init__(self, tables: _Tables) -> None:
        self.t = tables

    @staticmethod
    def _now() -> datetime:
        return datetime.now(UTC)

    async def append_event(self, event: OutboxEvent) -> None:
        self.t.outbox.append(event.message)

    async def insert_customer(self, customer_id: UUID, email: str, full_name: str,
                              phone_number: str | None) -> customer_store.Customer:
        if any(c.email == email for c in self.t.customers.values()):
            raise customer_store.Conflict("email")
        customer = customer_store.Customer(customer_id, email, full_name, False, self._now(), phone_number)
        self.t.customers[customer_id] = customer
        return customer

    async def get_customer(self, customer_id: UUID) -> customer_store.Customer | None:
        return self.t.customers.get(customer_id)

    async def set_verification_code(self, customer_id: UUID, code_hash: bytes, expire_time: datetime) -> None:
        self.t.verification_codes[customer_id] = customer_store.VerificationCode(customer_id, code_hash, expire_time,
                                                                                 0, None)

    async def lock_verification_code(self, customer_id: UUID) -> customer_store.VerificationCode | None:
        return self.t.verification_codes.get(customer_id)

    async def count_failed_attempt(self, customer_id: UUID) -> None:
        row = self.t.verification_codes[customer_id]
        self.t.verification_codes[customer_id] = dataclasses.replace(row, failed_attempts=row.failed_attempts + 1)

    async def mark_email_verified(self, customer_id: UUID) -> customer_store.Customer:
        code = self.t.verification_codes[customer_id]
        self.t.verification_codes[customer_id] = dataclasses.replace(code, used_time=self._now())
        self.t.customers[customer_id] = dataclasses.replace(self.t.customers[customer_id], email_verified=True)
        return self.t.customers[customer_id]

    async def insert_enrollment_token(self, token_hash: bytes, customer_id: UUID, expire_time: datetime) -> None:
        self.t.enrollment_tokens[token_hash] = (customer_id, expire_time, None)

    async def enrollment_token_is_live(self, token_hash: bytes) -> bool:
        row = self.t.enrollment_tokens.get(token_hash)
        return row is not None and row[2] is None and row[1] > self._now()

    async def use_enrollment_token(self, token_hash: bytes) -> UUID | None:
        if not await self.enrollment_token_is_live(token_hash):
            return None
        customer_id, expire_time, _ = self.t.enrollment_tokens[token_hash]
        self.t.enrollment_tokens[token_hash] = (customer_id, expire_time, self._now())
        return customer_id

    async def insert_credential(self, credential_id: UUID, username: str, customer_id: UUID | None, role: str,
                                password_hash: str) -> None:
        for existing in self.t.credentials.values():
            if existing.username == username:
                raise customer_store.Conflict("username")
            if customer_id is not None and existing.customer_id == customer_id:
                raise customer_store.Conflict("customer")
        self.t.credentials[credential_id] = customer_store.Credential(credential_id, username, customer_id, role,
                                                                      password_hash)

    async def upsert_teller(self, credential_id: UUID, username: str, password_hash: str) -> None:
        existing = await self.get_credential(username)
        if existing is None:
            await self.insert_credential(credential_id, username, None, "teller", password_hash)
        elif existing.role == "teller":
            await self.update_password_hash(existing.credential_id, password_hash)

    async def get_credential(self, username: str) -> customer_store.Credential | None:
        return next((c for c in self.t.credentials.values() if c.username == username), None)

    async def update_password_hash(self, credential_id: UUID, password_hash: str) -> None:
        self.t.credentials[credential_id] = dataclasses.replace(self.t.credentials[credential_id],
                                                                password_hash=password_hash)

    async def insert_session(self, session_id: UUID, credential_id: UUID, subject: str, role: str,
                             refresh_hash: bytes, refresh_expire_time: datetime) -> None:
        now = self._now()
        self.t.sessions[session_id] = _SessionRow(session_id, credential_id, subject, role, refresh_expire_time, now)
        self.t.refresh_tokens[refresh_hash] = (session_id, now, None)

    async def lock_refresh_token(self, token_hash: bytes) -> customer_store.RefreshTokenState | None:
        token = self.t.refresh_tokens.get(token_hash)
        if token is None:
            return None
        s = self.t.sessions[token[0]]
        return customer_store.RefreshTokenState(s.session_id, token[2], s.revoked_time, s.refresh_expire_time,
                                                s.subject, s.role)

    async def rotate_refresh_token(self, old_hash: bytes, new_hash: bytes, session_id: UUID) -> None:
        session, create_time, _ = self.t.refresh_tokens[old_hash]
        self.t.refresh_tokens[old_hash] = (session, create_time, self._now())
        self.t.refresh_tokens[new_hash] = (session_id, self._now(), None)

    async def get_session(self, session_id: UUID) -> customer_store.Session | None:
        s = self.t.sessions.get(session_id)
        return None if s is None else customer_store.Session(s.session_id, s.subject, s.role, s.revoked_time)

    async def revoke_session(self, session_id: UUID, reason: str) -> None:
        s = self.t.sessions[session_id]
        if s.revoked_time is None:
            s.revoked_time, s.revoke_reason = self._now(), reason

    def _live_sessions(self, customer_id: UUID) -> list[_SessionRow]:
        mine = {c.credential_id for c in self.t.credentials.values() if c.customer_id == customer_id}
        return [s for s in self.t.sessions.values()
                if s.credential_id in mine and s.revoked_time is None and s.refresh_expire_time > self._now()]

    async def list_active_sessions(self, customer_id: UUID, after: tuple[datetime, UUID] | None,
                                   limit: int) -> list[customer_store.ActiveSession]:
        rows = sorted(self._live_sessions(customer_id), key=lambda s: (s.create_time, s.session_id), reverse=True)
        rows = [s for s in rows if after is None or (s.create_time, s.session_id) < after]
        page = []
        for s in rows[:limit]:
            refreshed = max(t[1] for t in self.t.refresh_tokens.values() if t[0] == s.session_id)
            page.append(customer_store.ActiveSession(s.session_id, s.create_time,
                                                     refreshed if refreshed != s.create_time else None,
                                                     s.refresh_expire_time))
        return page

    async def lock_registration(self, email: str) -> customer_store.Customer | None:
        return await self.get_customer_by_email(email)

    async def delete_unverified_customer(self, customer_id: UUID) -> bool:
        customer = self.t.customers.get(customer_id)
        if customer is None or customer.email_verified:
            return False
        del self.t.customers[customer_id]
        # ON DELETE CASCADE (migrations/0003): what was the customer's goes with it.
        self.t.verification_codes.pop(customer_id, None)
        self.t.email_changes.pop(customer_id, None)
        self.t.enrollment_tokens = {k: v for k, v in self.t.enrollment_tokens.items() if v[0] != customer_id}
        self.t.password_resets = {k: v for k, v in self.t.password_resets.items()
                                  if v[0].customer_id != customer_id}
        return True

    async def delete_stale_registrations(self, older_than: datetime, limit: int) -> int:
        stale = sorted((c for c in self.t.customers.values() if not c.email_verified and c.create_time < older_than),
                       key=lambda c: c.create_time)[:limit]
        return sum([await self.delete_unverified_customer(c.customer_id) for c in stale])

    async def delete_stale_password_resets(self, older_than: datetime, limit: int) -> int:
        stale = sorted((e for e, r in self.t.password_resets.items() if r[1] < older_than),
                       key=lambda e: self.t.password_resets[e][1])[:limit]
        for email in stale:
            del self.t.password_resets[email]
        return len(stale)

    async def get_customer_by_email(self, email: str) -> customer_store.Customer | None:
        return next((c for c in self.t.customers.values() if c.email == email), None)

    async def get_customer_credential(self, customer_id: UUID) -> customer_store.Credential | None:
        return next((c for c in self.t.credentials.values() if c.customer_id == customer_id), None)

    async def reset_target(self, email: str) -> tuple[UUID, str] | None:
        customer = await self.get_customer_by_email(email)
        if customer is None or not customer.email_verified:
            return None
        credential = await self.get_customer_credential(customer.customer_id)
        return None if credential is None else (customer.customer_id, credential.username)

    async def set_password_reset(self, email: str, customer_id: UUID | None, code_hash: bytes,
                                 expire_time: datetime) -> None:
        self.t.password_resets[email] = (customer_store.PendingCode(customer_id, code_hash, expire_time, 0),
                                         self._now(), None)

    async def lock_password_reset(self, email: str) -> customer_store.PendingCode | None:
        row = self.t.password_resets.get(email)
        return row[0] if row is not None and row[2] is None else None

    async def count_failed_reset(self, email: str) -> None:
        pending, create_time, used_time = self.t.password_resets[email]
        self.t.password_resets[email] = (dataclasses.replace(pending, failed_attempts=pending.failed_attempts + 1),
                                         create_time, used_time)

    async def use_password_reset(self, email: str) -> None:
        pending, create_time, _ = self.t.password_resets[email]
        self.t.password_resets[email] = (pending, create_time, self._now())

    async def set_password(self, customer_id: UUID, password_hash: str) -> None:
        credential = await self.get_customer_credential(customer_id)
        if credential is not None:
            await self.update_password_hash(credential.credential_id, password_hash)

    async def revoke_customer_sessions(self, customer_id: UUID, reason: str, keep: UUID | None = None) -> list[UUID]:
        revoked = []
        for s in self._live_sessions(customer_id):
            if s.session_id != keep:
                await self.revoke_session(s.session_id, reason)
                revoked.append(s.session_id)
        return revoked

    async def update_profile(self, customer_id: UUID, changes: dict[str, str | None]) -> customer_store.Customer | None:
        assert changes and set(changes) <= {"full_name", "phone_number"}, changes
        customer = self.t.customers.get(customer_id)
        if customer is None:
            return None
        self.t.customers[customer_id] = dataclasses.replace(customer, **changes)  # type: ignore[arg-type]
        return self.t.customers[customer_id]

    async def set_email_change(self, customer_id: UUID, new_email: str, code_hash: bytes,
                               expire_time: datetime) -> None:
        self.t.email_changes[customer_id] = customer_store.PendingCode(customer_id, code_hash, expire_time, 0,
                                                                       new_email)

    async def lock_email_change(self, customer_id: UUID) -> customer_store.PendingCode | None:
        return self.t.email_changes.get(customer_id)

    async def count_failed_email_change(self, customer_id: UUID) -> None:
        pending = self.t.email_changes[customer_id]
        self.t.email_changes[customer_id] = dataclasses.replace(pending, failed_attempts=pending.failed_attempts + 1)

    async def apply_email_change(self, customer_id: UUID, new_email: str) -> customer_store.Customer:
        del self.t.email_changes[customer_id]
        if any(c.email == new_email for c in self.t.customers.values()):
            raise customer_store.Conflict("email")  # the unique index: a programmer error if reached
        self.t.customers[customer_id] = dataclasses.replace(self.t.customers[customer_id], email=new_email)
        return self.t.customers[customer_id]


class FakeCustomerStore:
    """svc_customer's store.CustomerStore: a transaction works on a copy of the tables, kept at
    the end of the block and dropped if it raises (cosmicpython's FakeUnitOfWork: commit or
    rollback), so a use case that counts a wrong code and then refuses is seen to have counted."""

    def __init__(self) -> None:
        self.tables = _Tables()
        self.commits = 0

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[FakeCustomerTx]:
        work = copy.deepcopy(self.tables)
        yield FakeCustomerTx(work)
        self.tables = work  # reached only when the block did not raise: committed
        self.commits += 1

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[FakeCustomerTx]:
        yield FakeCustomerTx(self.tables)

    def events(self, kind: type[M]) -> list[M]:
        """The events of this type in the outbox, oldest first."""
        return [e for e in self.tables.outbox if isinstance(e, kind)]


class FakeLimiter:
    """common/ratelimit.SlidingWindow: events per count within each window; a reservation is an
    event until settled, and stays one only if its attempt failed."""

    def __init__(self) -> None:
        self.events: dict[str, list[tuple[float, str]]] = {}  # count key -> (monotonic time, attempt)

    def _live(self, count: ratelimit.Count) -> list[tuple[float, str]]:
        since = time.monotonic() - count.limit.window_s
        self.events[count.key] = [e for e in self.events.get(count.key, []) if e[0] > since]
        return self.events[count.key]

    async def retry_after_s(self, counts: Sequence[ratelimit.Count]) -> float:
        waits = [self._live(c)[0][0] + c.limit.window_s - time.monotonic() for c in counts
                 if c.limit.enabled and len(self._live(c)) >= c.limit.max_events]
        return max(waits, default=0.0)

    async def record(self, counts: Sequence[ratelimit.Count]) -> None:
        for count in counts:
            self._live(count).append((time.monotonic(), ""))

    async def clear(self, counts: Sequence[ratelimit.Count]) -> None:
        for count in counts:
            self.events.pop(count.key, None)

    async def reserve(self, counts: Sequence[ratelimit.Count]) -> tuple[str, float]:
        wait = await self.retry_after_s(counts)
        if wait > 0:
            return "", wait
        attempt = uuid.uuid4().hex
        for count in counts:
            self._live(count).append((time.monotonic(), attempt))
        return attempt, 0.0

    async def settle(self, counts: Sequence[ratelimit.Count], attempt: str, *, failed: bool) -> None:
        if attempt and not failed:
            for count in counts:
                self.events[count.key] = [e for e in self._live(count) if e[1] != attempt]

    def count(self, limit: ratelimit.Limit, subject: str) -> int:
        return len(self._live(ratelimit.Count(limit, subject)))


class FakeRevocations:
    """common/auth.Revocations: the sessions revoked, in order."""

    def __init__(self) -> None:
        self.revoked: list[str] = []

    async def revoke(self, session_id: str) -> None:
        self.revoked.append(session_id)


# --- svc_notify ---------------------------------------------------------------------------------

class FakeNotifyStore:
    """svc_notify's store.Store: the customer_contacts projection (Postgres) and the notification
    records and customers' lists (Cassandra), with Cassandra's upserts (a write overwrites)."""

    def __init__(self) -> None:
        self.contacts: dict[UUID, tuple[str, str, bool, datetime]] = {}  # email, full name, verified, event time
        self.records: dict[UUID, notify_store.Notification] = {}
        self.lists: dict[UUID, dict[UUID, notify_store.Notification]] = {}
        self.failures_to_come = 0  # the next calls that fail as Cassandra's timeouts do
        self.calls = 0

    def _call(self) -> None:
        self.calls += 1
        if self.failures_to_come > 0:
            self.failures_to_come -= 1
            raise OperationTimedOut(errors={}, last_host="fake")

    async def upsert_registered_contact(self, customer_id: UUID, email: str, full_name: str,
                                        event_time: datetime) -> bool:
        self._call()
        row = self.contacts.get(customer_id)
        if row is not None and row[3] >= event_time:
            return False
        self.contacts[customer_id] = (email, full_name, False, event_time)
        return True

    async def mark_contact_verified(self, customer_id: UUID, email: str, event_time: datetime) -> bool:
        self._call()
        row = self.contacts.get(customer_id)
        if row is not None and row[3] >= event_time:
            return False
        self.contacts[customer_id] = (email, row[1] if row else "", True, event_time)
        return True

    async def get_contacts(self, customer_ids: list[UUID]) -> dict[UUID, str]:
        self._call()
        return {c: self.contacts[c][0] for c in customer_ids if c in self.contacts}

    async def get_notifications(self, notification_ids: list[UUID]) -> dict[UUID, notify_store.Notification]:
        self._call()
        return {n: self.records[n] for n in notification_ids if n in self.records}

    async def put_notification(self, notification: notify_store.Notification, update_time: datetime) -> None:
        self._call()
        self.records[notification.notification_id] = notification
        self.lists.setdefault(notification.customer_id, {})[notification.notification_id] = notification

    async def put_in_customer_log(self, notification: notify_store.Notification) -> None:
        self._call()
        self.lists.setdefault(notification.customer_id, {})[notification.notification_id] = notification

    async def list_customer_notifications(self, customer_id: UUID, limit: int,
                                          after: tuple[datetime, UUID] | None) -> list[notify_store.Notification]:
        self._call()
        rows = sorted(self.lists.get(customer_id, {}).values(), key=lambda n: (n.create_time, n.notification_id),
                      reverse=True)
        return [n for n in rows if after is None or (n.create_time, n.notification_id) < after][:limit]


class FakeMailer:
    """svc_notify's mailer.Mailer: the emails accepted, and the failures to answer the next
    attempts with (TransientMailError, PermanentMailError), in order."""

    def __init__(self) -> None:
        self.sent: list[Email] = []
        self.failures: list[Exception] = []
        self.attempts = 0

    async def send(self, email: Email) -> None:
        self.attempts += 1
        if self.failures:
            raise self.failures.pop(0)
        self.sent.append(email)

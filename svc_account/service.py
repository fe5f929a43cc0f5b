"""svc_account's use cases. Balances and the status that movements obey live in the ledger of
svc_transfer; svc_account keeps who owns which account and asks the ledger (internal gRPC) to
open accounts, change their status and read balances. Opening the ledger account first means
a transfer never needs a call to svc_account."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Protocol
from uuid import UUID

import grpc
from bank.customer.v1 import customer_internal_pb2, customer_internal_pb2_grpc
from bank.events.v1 import events_pb2
from bank.transfer.v1 import ledger_pb2, ledger_pb2_grpc
from psycopg_pool import AsyncConnectionPool

from common import auth, cassandra, pagination
from common.clients import INTERNAL_TIMEOUT_S, InternalChannel, call
from common.consumer import BadEvent, EventMeta, StorageUnavailable
from common.currencies import SUPPORTED_CURRENCIES
from common.errors import DomainError
from common.ids import parse_uuid, uuid7
from common.logging import fields
from common.retry import Backoff, retry
from svc_account import store

log = logging.getLogger("account")

STATUS_NAMES = {ledger_pb2.LedgerAccount.ACTIVE: "ACTIVE", ledger_pb2.LedgerAccount.FROZEN: "FROZEN",
                ledger_pb2.LedgerAccount.CLOSED: "CLOSED"}


class Activities(Protocol):
    """The statements' store: store.ActivityStore, or the fake of tests/unit."""

    async def put_activities(self, lines: list[store.Activity]) -> None: ...

    async def months(self, account_id: UUID, up_to: int | None, limit: int) -> list[int]: ...

    async def month_page(self, account_id: UUID, month: int, after: tuple[datetime, UUID] | None,
                         limit: int) -> list[store.Activity]: ...


@dataclass(frozen=True)
class AccountView:
    account: store.Account
    balance: int
    status: str


def _not_found() -> DomainError:
    return DomainError(grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND", "no such account")


class AccountUseCases:
    def __init__(self, pool: AsyncConnectionPool, ledger: InternalChannel, customers: InternalChannel,
                 activity: Activities) -> None:
        self._pool = pool
        self._activity = activity
        self._ledger_channel = ledger
        self._ledger = ledger_pb2_grpc.LedgerServiceStub(ledger.channel)
        self._customers_channel = customers
        self._customers = customer_internal_pb2_grpc.CustomerInternalServiceStub(customers.channel)

    async def create_account(self, caller: auth.Caller, currency: str) -> AccountView:
        if caller.customer_id is None:
            raise DomainError(grpc.StatusCode.PERMISSION_DENIED, "CUSTOMER_ONLY", "only customers open accounts")
        currency = currency.strip().upper()
        if currency not in SUPPORTED_CURRENCIES:
            raise DomainError(grpc.StatusCode.INVALID_ARGUMENT, "UNSUPPORTED_CURRENCY",
                              f"currency must be one of {', '.join(sorted(SUPPORTED_CURRENCIES))}",
                              field_violations=[("currency", "unsupported ISO 4217 code")])
        profile = await call(self._customers.GetCustomerProfile(
            customer_internal_pb2.GetCustomerProfileRequest(customer_id=caller.customer_id),
            metadata=self._customers_channel.metadata(), timeout=INTERNAL_TIMEOUT_S))
        if not profile.email_verified:
            raise DomainError(grpc.StatusCode.FAILED_PRECONDITION, "EMAIL_NOT_VERIFIED",
                              "verify your email before opening an account")
        account_id = uuid7()
        # The ledger first: if the local insert then fails, an empty ledger account nobody can
        # see is left behind, which is harmless; the other order could show an account the
        # ledger does not know.
        await call(self._ledger.OpenLedgerAccount(
            ledger_pb2.OpenLedgerAccountRequest(account_id=str(account_id), customer_id=caller.customer_id,
                                                currency=currency),
            metadata=self._ledger_channel.metadata(), timeout=INTERNAL_TIMEOUT_S))
        async with self._pool.connection() as conn:
            account = await store.insert_account(conn, account_id, UUID(caller.customer_id), currency)
        return AccountView(account, 0, "ACTIVE")

    async def _owned(self, caller: auth.Caller, account_id: str) -> store.Account:
        aid = parse_uuid(account_id)
        async with self._pool.connection() as conn:
            account = await store.get_account(conn, aid) if aid else None
        # Another customer's account is not found, exactly as a missing one.
        if account is None or not (caller.is_teller or str(account.customer_id) == caller.customer_id):
            raise _not_found()
        return account

    async def _with_ledger(self, accounts: list[store.Account]) -> list[AccountView]:
        if not accounts:
            return []
        reply = await call(self._ledger.BatchGetLedgerAccounts(
            ledger_pb2.BatchGetLedgerAccountsRequest(account_ids=[str(a.account_id) for a in accounts]),
            metadata=self._ledger_channel.metadata(), timeout=INTERNAL_TIMEOUT_S))
        by_id = {entry.account_id: entry for entry in reply.ledger_accounts}
        views = []
        for account in accounts:
            entry = by_id.get(str(account.account_id))
            if entry is None:  # the ledger is the source of truth; a local row without it is a bug
                raise RuntimeError(f"account {account.account_id} has no ledger account")
            views.append(AccountView(account, entry.balance, STATUS_NAMES[entry.status]))
        return views

    async def get_account(self, caller: auth.Caller, account_id: str) -> AccountView:
        return (await self._with_ledger([await self._owned(caller, account_id)]))[0]

    async def list_accounts(self, caller: auth.Caller, page_size: int, page_token: str) -> tuple[list[AccountView], str]:
        size = pagination.page_size(page_size)
        key = pagination.decode_token(page_token, 2)
        if caller.customer_id is None:
            return [], ""  # a teller owns no accounts
        after = None
        if key is not None:
            try:
                after = (datetime.fromisoformat(key[0]), UUID(key[1]))
            except (TypeError, ValueError) as exc:
                raise pagination.invalid_token() from exc
        async with self._pool.connection() as conn:
            rows = await store.list_accounts(conn, UUID(caller.customer_id), after, size + 1)
        page, more = rows[:size], len(rows) > size
        token = pagination.encode_token([page[-1].create_time.isoformat(), str(page[-1].account_id)]) if more else ""
        return await self._with_ledger(page), token

    async def _set_status(self, account: store.Account, status: int) -> AccountView:
        reply = await call(self._ledger.SetLedgerAccountStatus(
            ledger_pb2.SetLedgerAccountStatusRequest(account_id=str(account.account_id), status=status),  # type: ignore[arg-type]
            metadata=self._ledger_channel.metadata(), timeout=INTERNAL_TIMEOUT_S))
        async with self._pool.connection() as conn:
            await store.set_status(conn, account.account_id, STATUS_NAMES[reply.status])
        return AccountView(account, reply.balance, STATUS_NAMES[reply.status])

    async def close_account(self, caller: auth.Caller, account_id: str) -> AccountView:
        account = await self._owned(caller, account_id)
        if caller.customer_id is None:
            raise _not_found()  # closing is the owner's act
        return await self._set_status(account, ledger_pb2.LedgerAccount.CLOSED)

    async def freeze_account(self, caller: auth.Caller, account_id: str, frozen: bool) -> AccountView:
        account = await self._owned(caller, account_id)
        return await self._set_status(account, ledger_pb2.LedgerAccount.FROZEN if frozen else ledger_pb2.LedgerAccount.ACTIVE)

    async def list_activity(self, caller: auth.Caller, account_id: str, page_size: int,
                            page_token: str) -> tuple[list[store.Activity], str]:
        """The account's statement, newest first, across its months (own accounts; tellers any)."""
        size = pagination.page_size(page_size)
        after = _activity_page_key(page_token)
        account = await self._owned(caller, account_id)
        try:
            lines = await _read_statement(self._activity, account.account_id, size + 1, after)
        except store.TRANSIENT_ERRORS as exc:
            log.warning("history store unavailable", extra=fields(error=f"{type(exc).__name__}: {exc}"))
            raise DomainError(grpc.StatusCode.UNAVAILABLE, "ACTIVITY_UNAVAILABLE",
                              "account activity cannot be read now; retry") from exc
        page = lines[:size]
        token = ""
        if len(lines) > size:  # one more than asked was read: a next page exists
            last = page[-1]
            # Integer milliseconds, exactly: a float could round past a line and skip it.
            token = pagination.encode_token([last.month, (last.create_time - EPOCH) // timedelta(milliseconds=1),
                                             str(last.activity_id)])
        return page, token


# --- statements: the projection of MoneyMoved, and its reading ------------------------------

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Derives statement line ids from (transfer id, account id); never change it, or redelivered
# events would make second lines.
ACTIVITY_ID_NAMESPACE = uuid.UUID("0b6e3c55-7f0e-4b8e-9a55-2f1f5d3c9a71")
DESCRIPTION_LENGTH_MAX = 500
STORAGE_BACKOFF = Backoff(tries=5, initial_s=0.2, max_s=5.0)
STORAGE_CALLS_PER_TRY = 2  # the months, then the lines (each step's writes side by side)
# Longest the projection of one event can take when Cassandra hangs on every try.
EVENT_WORST_CASE_S = STORAGE_BACKOFF.worst_case_s(STORAGE_CALLS_PER_TRY * (cassandra.REQUEST_TIMEOUT_S
                                                                           + cassandra.BRIDGE_SLACK_S))


class Outcome(StrEnum):
    APPLIED = "applied"  # written (or written again, identically, for a redelivered event)


def month_of(moment: datetime) -> int:
    return moment.year * 100 + moment.month


def activity_id(transfer_id: str, account_id: UUID) -> uuid.UUID:
    return uuid.uuid5(ACTIVITY_ID_NAMESPACE, f"{transfer_id}/{account_id}")


def _account_id(value: str, side: str) -> UUID:
    parsed = parse_uuid(value)
    if parsed is None:
        raise BadEvent(f"{side}_account_id is not a UUID")
    return parsed


def statement_lines(event: events_pb2.MoneyMoved, meta: EventMeta) -> list[store.Activity]:
    """The lines a movement adds to statements: both sides of a transfer, the customer side of
    a deposit or withdrawal (the cash side has no account here)."""
    if event.amount <= 0:
        raise BadEvent("amount is not positive")
    if not event.transfer_id or not event.currency:
        raise BadEvent("transfer_id or currency is empty")
    moment = event.create_time.ToDatetime(tzinfo=UTC) if event.HasField("create_time") else meta.fallback_time
    moment = moment.replace(microsecond=moment.microsecond // 1000 * 1000)  # Cassandra keeps milliseconds
    description = event.description[:DESCRIPTION_LENGTH_MAX]

    def line(account: UUID, kind: str, amount: int, balance_after: int, counterparty: str) -> store.Activity:
        return store.Activity(account_id=account, month=month_of(moment), create_time=moment,
                              activity_id=activity_id(event.transfer_id, account), transfer_id=event.transfer_id,
                              kind=kind, amount=amount, currency=event.currency, balance_after=balance_after,
                              counterparty_account_id=counterparty, description=description)

    MoneyMoved = events_pb2.MoneyMoved
    if event.kind == MoneyMoved.TRANSFER:
        source, target = _account_id(event.from_account_id, "from"), _account_id(event.to_account_id, "to")
        return [line(source, "TRANSFER_SENT", -event.amount, event.from_balance_after, event.to_account_id),
                line(target, "TRANSFER_RECEIVED", event.amount, event.to_balance_after, event.from_account_id)]
    if event.kind == MoneyMoved.DEPOSIT:
        return [line(_account_id(event.to_account_id, "to"), "DEPOSIT", event.amount, event.to_balance_after, "")]
    if event.kind == MoneyMoved.WITHDRAWAL:
        return [line(_account_id(event.from_account_id, "from"), "WITHDRAWAL", -event.amount,
                     event.from_balance_after, "")]
    raise BadEvent(f"unknown movement kind {event.kind}")


async def money_moved(activity: Activities, event: events_pb2.MoneyMoved, meta: EventMeta) -> Outcome:
    """Project a movement into the statements of its accounts. Every write is an idempotent
    upsert of a key derived from the event, so a redelivered event changes nothing."""
    lines = statement_lines(event, meta)
    try:
        await retry(lambda: activity.put_activities(lines), what="statement lines write",
                    transient=store.TRANSIENT_ERRORS, backoff=STORAGE_BACKOFF)
    except store.TRANSIENT_ERRORS as exc:
        raise StorageUnavailable(f"statement lines write: {type(exc).__name__}: {exc}") from exc
    return Outcome.APPLIED


def _activity_page_key(token: str) -> tuple[int, tuple[datetime, UUID]] | None:
    key = pagination.decode_token(token, 3)
    if key is None:
        return None
    month, create_time_ms, raw_id = key
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (month, create_time_ms)) \
            or not isinstance(raw_id, str):
        raise pagination.invalid_token()
    parsed_id = parse_uuid(raw_id)
    try:
        create_time = EPOCH + timedelta(milliseconds=create_time_ms)
    except OverflowError as exc:
        raise pagination.invalid_token() from exc
    if parsed_id is None or not 100 <= month <= 999_912:
        raise pagination.invalid_token()
    return month, (create_time, parsed_id)


# A month is listed before its line is written (a line is never unreachable), so a month can
# stay empty when that write failed for good. A page steps over such months, up to this many
# months in all: the work stays bounded by the page size and this, never by the account's age.
STATEMENT_MONTHS_SCANNED_MAX = 240


def _month_before(month: int) -> int:
    year, number = divmod(month, 100)
    return month - 1 if number > 1 else (year - 1) * 100 + 12


async def _read_statement(activity: Activities, account_id: UUID, limit: int,
                          after: tuple[int, tuple[datetime, UUID]] | None) -> list[store.Activity]:
    """Up to limit lines, newest first, strictly after the page key. Months are read limit + 1
    at a time (as many as the page can need when each holds a line, the first one possibly
    none after the key); more only while empty months leave the page short."""
    lines: list[store.Activity] = []
    up_to = after[0] if after else None
    scanned = 0
    while len(lines) < limit and scanned < STATEMENT_MONTHS_SCANNED_MAX:
        months = await activity.months(account_id, up_to, limit + 1)
        for month in months:
            key = after[1] if after is not None and month == after[0] else None
            lines += await activity.month_page(account_id, month, key, limit - len(lines))
            if len(lines) >= limit:
                break
        scanned += len(months)
        if len(months) < limit + 1:  # no older months
            break
        up_to = _month_before(months[-1])
    return lines

"""svc_account's use cases, one async function per RPC (docs/decisions/0018). Balances and the
status that movements obey live in the ledger of svc_transfer; svc_account keeps who owns which
account and asks the ledger (through clients.LedgerClient) to open accounts, change their
status and read balances. Opening the ledger account first means a transfer never needs a call
to svc_account. The use cases take their stores and clients as parameters and raise domain
errors by reason; they speak neither SQL nor gRPC."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Protocol
from uuid import UUID

from bank.events.v1 import events_pb2

from common import auth, cassandra, pagination
from common.consumer import BadEvent, EventMeta, StorageUnavailable
from common.currencies import SUPPORTED_CURRENCIES
from common.errors import DomainError, refused
from common.ids import parse_uuid, uuid7
from common.logging import fields
from common.retry import Backoff, retry
from svc_account import store
from svc_account.clients import LedgerState

log = logging.getLogger("account")



class Accounts(Protocol):
    """Who owns which account: store.AccountStore, or the fake of tests/unit."""

    async def insert_account(self, account_id: UUID, customer_id: UUID, currency: str) -> store.Account: ...

    async def get_account(self, account_id: UUID) -> store.Account | None: ...

    async def list_accounts(self, customer_id: UUID, after: tuple[datetime, UUID] | None,
                            limit: int) -> list[store.Account]: ...

    async def set_status(self, account_id: UUID, status: str) -> None: ...


class Ledger(Protocol):
    """The ledger's side of accounts: clients.LedgerClient (svc_transfer), or a fake in tests/unit."""

    async def open_account(self, account_id: str, customer_id: str, currency: str) -> None: ...

    async def set_status(self, account_id: str, status: str) -> LedgerState: ...

    async def states(self, account_ids: list[str]) -> dict[str, LedgerState]: ...


class Customers(Protocol):
    """What svc_account asks of svc_customer: clients.CustomerClient, or a fake in tests/unit."""

    async def email_verified(self, customer_id: str) -> bool: ...


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
    available_balance: int  # as the ledger computes it: balance minus PENDING holds as payer
    status: str


def _not_found() -> DomainError:
    return refused("ACCOUNT_NOT_FOUND", "no such account")


async def create_account(accounts: Accounts, ledger: Ledger, customers: Customers, caller: auth.Caller,
                         currency: str) -> AccountView:
    if caller.customer_id is None:
        raise refused("CUSTOMER_ONLY", "only customers open accounts")
    currency = currency.strip().upper()
    if currency not in SUPPORTED_CURRENCIES:
        raise refused("UNSUPPORTED_CURRENCY", f"currency must be one of {', '.join(sorted(SUPPORTED_CURRENCIES))}",
                      field_violations=[("currency", "unsupported ISO 4217 code")])
    if not await customers.email_verified(caller.customer_id):
        raise refused("EMAIL_NOT_VERIFIED", "verify your email before opening an account")
    account_id = uuid7()
    # The ledger first: if the local insert then fails, an empty ledger account nobody can
    # see is left behind, which is harmless; the other order could show an account the
    # ledger does not know.
    await ledger.open_account(str(account_id), caller.customer_id, currency)
    account = await accounts.insert_account(account_id, UUID(caller.customer_id), currency)
    return AccountView(account, 0, 0, "ACTIVE")


async def _owned(accounts: Accounts, caller: auth.Caller, account_id: str) -> store.Account:
    aid = parse_uuid(account_id)
    account = await accounts.get_account(aid) if aid else None
    # Another customer's account is not found, exactly as a missing one.
    if account is None or not (caller.is_teller or str(account.customer_id) == caller.customer_id):
        raise _not_found()
    return account


async def _with_ledger(ledger: Ledger, page: list[store.Account]) -> list[AccountView]:
    if not page:
        return []
    states = await ledger.states([str(a.account_id) for a in page])
    views = []
    for account in page:
        state = states.get(str(account.account_id))
        if state is None:  # the ledger is the source of truth; a local row without it is a bug
            raise RuntimeError(f"account {account.account_id} has no ledger account")
        views.append(AccountView(account, state.balance, state.available_balance, state.status))
    return views


async def get_account(accounts: Accounts, ledger: Ledger, caller: auth.Caller, account_id: str) -> AccountView:
    return (await _with_ledger(ledger, [await _owned(accounts, caller, account_id)]))[0]


async def list_accounts(accounts: Accounts, ledger: Ledger, caller: auth.Caller, page_size: int,
                        page_token: str) -> tuple[list[AccountView], str]:
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
    rows = await accounts.list_accounts(UUID(caller.customer_id), after, size + 1)
    page, more = rows[:size], len(rows) > size
    token = pagination.encode_token([page[-1].create_time.isoformat(), str(page[-1].account_id)]) if more else ""
    return await _with_ledger(ledger, page), token


async def _set_status(accounts: Accounts, ledger: Ledger, account: store.Account, status: str) -> AccountView:
    state = await ledger.set_status(str(account.account_id), status)
    assert state.status == status, f"the ledger set {state.status}, not {status}"
    await accounts.set_status(account.account_id, state.status)
    return AccountView(account, state.balance, state.available_balance, state.status)


async def close_account(accounts: Accounts, ledger: Ledger, caller: auth.Caller, account_id: str) -> AccountView:
    account = await _owned(accounts, caller, account_id)
    if caller.customer_id is None:
        raise _not_found()  # closing is the owner's act
    return await _set_status(accounts, ledger, account, "CLOSED")


async def freeze_account(accounts: Accounts, ledger: Ledger, caller: auth.Caller, account_id: str,
                         frozen: bool) -> AccountView:
    account = await _owned(accounts, caller, account_id)
    return await _set_status(accounts, ledger, account, "FROZEN" if frozen else "ACTIVE")


async def list_activity(accounts: Accounts, activity: Activities, caller: auth.Caller, account_id: str,
                        page_size: int, page_token: str) -> tuple[list[store.Activity], str]:
    """The account's statement, newest first, across its months (own accounts; tellers any)."""
    size = pagination.page_size(page_size)
    after = _activity_page_key(page_token)
    account = await _owned(accounts, caller, account_id)
    try:
        lines = await _read_statement(activity, account.account_id, size + 1, after)
    except store.TRANSIENT_ERRORS as exc:
        log.warning("history store unavailable", extra=fields(error=f"{type(exc).__name__}: {exc}"))
        raise refused("ACTIVITY_UNAVAILABLE", "account activity cannot be read now; retry") from exc
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
        lines = [line(source, "TRANSFER_SENT", -event.amount, event.from_balance_after, event.to_account_id),
                 line(target, "TRANSFER_RECEIVED", event.amount, event.to_balance_after, event.from_account_id)]
        # Double entry: the two sides of a transfer sum to zero, and are two lines, not one twice.
        assert sum(a.amount for a in lines) == 0 and lines[0].activity_id != lines[1].activity_id
        return lines
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

"""svc_transfer's use cases, one async function per RPC, reading like API.md's transfer rules.

Input that is wrong whatever the ledger holds (request_id, amount, description, currency
format, same account, ids that are not UUIDs) is refused here, before the database. Everything
that depends on the ledger's state is decided by the movement function under the accounts'
locks (see store.py and migrations/0005_set_based_batch.sql) and comes back as a reason code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Protocol

from prometheus_client import Counter

from common import errors, events, pagination
from common.auth import Caller, Role
from common.currencies import SUPPORTED_CURRENCIES
from common.errors import DomainError, invalid
from common.grpcutil import EPOCH
from common.ids import REQUEST_ID_LENGTH_MAX, parse_uuid
from svc_transfer import store
from svc_transfer.store import AccountChange, LedgerAccount, Movement, MovementRequest, Transfer, VisibleTransfer

DESCRIPTION_LENGTH_MAX = 200
BATCH_GET_SIZE_MAX = 500
INT64_MAX = 2**63 - 1
CURRENCY_CODE = re.compile(r"^[A-Z]{3}$")
ACCOUNT_STATUSES = ("ACTIVE", "FROZEN", "CLOSED")

class Movements(Protocol):
    """Where a movement goes: batching.MovementBatcher (group commit), or a fake in tests/unit."""

    async def move(self, request: MovementRequest) -> Movement: ...


class Ledger(Protocol):
    """The ledger's accounts and movement reads: store.LedgerStore, or a fake in tests/unit."""

    async def open_ledger_account(self, account_id: str, customer_id: str, currency: str) -> AccountChange: ...

    async def set_ledger_account_status(self, account_id: str, status: str) -> AccountChange: ...

    async def customer_accounts(self, account_ids: Sequence[str]) -> dict[str, LedgerAccount]: ...

    async def visible_transfer(self, transfer_id: str) -> VisibleTransfer | None: ...

    async def account_transfers(self, account_id: str, after: tuple[datetime, str] | None,
                                limit: int) -> list[Transfer]: ...


# What each reason the ledger can answer tells the caller (its gRPC code: common/errors.CODES).
MESSAGES: dict[str, str] = {
    "INVALID_AMOUNT": "amount must be > 0, and the resulting balances must fit in int64",
    "SAME_ACCOUNT": "from_account_id and to_account_id are the same account",
    "UNSUPPORTED_CURRENCY": "the currency is not supported",
    "CURRENCY_MISMATCH": "currency differs from the account's currency",
    "INSUFFICIENT_FUNDS": "the source account's available balance is too low",
    "ACCOUNT_INACTIVE": "the account is frozen or closed",
    "ACCOUNT_NOT_EMPTY": "only an account with a zero balance and no pending hold can be closed",
    "ACCOUNT_NOT_FOUND": "account not found",
    "TRANSFER_NOT_FOUND": "transfer not found",
    "IDEMPOTENCY_KEY_REUSED": "this request_id was already used with different parameters",
    "ACCOUNT_ALREADY_EXISTS": "the account_id exists with another customer_id or currency",
    "LEDGER_BUSY": "the ledger is busy; retry with the same request_id",
    "TRANSFER_NOT_PENDING": "the transfer is not a PENDING hold",
    "HOLD_EXPIRED": "the hold has expired: it can no longer be posted or voided",
    "NOT_PAYEE": "only the payee (the owner of to_account_id) or a teller can post or void a hold",
    "EXCEEDS_HELD_AMOUNT": "amount is more than the held amount",
}
HOLD_SECONDS_MIN = 60
HOLD_SECONDS_MAX = 7 * 24 * 3600


def refused(reason: str) -> DomainError:
    return errors.refused(reason, MESSAGES[reason])


def initiator(caller: Caller) -> str:
    """The scope of a caller's request_ids."""
    return f"{caller.role.value}:{caller.subject}"


def public(transfer: Transfer) -> Transfer:
    """The transfer as the API shows it: the bank's cash account is never shown."""
    if transfer.kind == "DEPOSIT":
        return dataclasses.replace(transfer, from_account_id="")
    if transfer.kind == "WITHDRAWAL":
        return dataclasses.replace(transfer, to_account_id="")
    return transfer


def _sees_everything(caller: Caller) -> bool:
    return caller.role is Role.TELLER


def _customer_id(caller: Caller) -> str | None:
    """The caller's customer id, normalized like the ledger's; None for a teller."""
    parsed = parse_uuid(caller.customer_id or "")
    return None if parsed is None else str(parsed)


@contextlib.contextmanager
def _busy_is_unavailable() -> Iterator[None]:
    """Operating errors (store.LedgerBusy): the caller may retry with the same request_id."""
    try:
        yield
    except store.LedgerBusy as exc:
        raise refused("LEDGER_BUSY") from exc


def _check_request(request_id: str, amount: int | None) -> None:
    """What every movement checks first: its request_id, and its amount when it names one."""
    if not 1 <= len(request_id) <= REQUEST_ID_LENGTH_MAX:
        raise invalid("request_id", f"must be 1 to {REQUEST_ID_LENGTH_MAX} characters")
    if amount is not None and not 0 < amount <= INT64_MAX:
        raise refused("INVALID_AMOUNT")


def _check_movement_input(request_id: str, amount: int, currency: str, description: str) -> None:
    _check_request(request_id, amount)
    if len(description) > DESCRIPTION_LENGTH_MAX:
        raise invalid("description", f"must be at most {DESCRIPTION_LENGTH_MAX} characters")
    if not CURRENCY_CODE.match(currency):
        raise invalid("currency", "must be an ISO 4217 code such as USD")


def _account_id(value: str) -> str:
    """A UUID account id, normalized; anything else names no account."""
    parsed = parse_uuid(value)
    if parsed is None:
        raise refused("ACCOUNT_NOT_FOUND")
    return str(parsed)


MOVEMENTS = Counter("ledger_movements_total", "Movement requests by kind, currency and outcome (OK or the reason)",
                    ["kind", "currency", "outcome"])
MOVED_MINOR_UNITS = Counter("ledger_moved_minor_units_total", "Money moved, in the currency's minor units",
                            ["kind", "currency"])


# Label values come from requests: anything but the bank's currencies is one label, not many.
METRIC_CURRENCIES = SUPPORTED_CURRENCIES


def _currency_label(currency: str) -> str:
    """A refused post or void names no currency (the hold's is read under its lock, and a
    refusal returns none): UNKNOWN, apart from requests in currencies the bank lacks (OTHER)."""
    if not currency:
        return "UNKNOWN"
    return currency if currency in METRIC_CURRENCIES else "OTHER"


def _nothing() -> None:
    pass


# Kinds whose accepted movements move money (a hold's placement, void and expiry move none).
MONEY_KINDS = frozenset({"TRANSFER", "DEPOSIT", "WITHDRAWAL", "POST"})


def _refusal(movement: Movement) -> DomainError:
    assert movement.error is not None
    if movement.error == "TRANSFER_NOT_PENDING" and movement.status:
        return errors.refused(movement.error, f"the transfer is {movement.status}, not PENDING")
    return refused(movement.error)


async def _apply(movements: Movements, request: MovementRequest, metric_kind: str,
                 on_commit: Callable[[], None]) -> Transfer:
    """One movement through the batcher: the transfer it made (or had made), or its refusal."""
    with _busy_is_unavailable():
        movement = await movements.move(request)
    currency = movement.transfer.currency if movement.transfer is not None else request.currency
    label = _currency_label(currency)
    if movement.error is not None:
        MOVEMENTS.labels(metric_kind, label, movement.error).inc()
        raise _refusal(movement)
    assert movement.transfer is not None
    # A replay returns the original transfer and moves nothing: counted once, as REPLAYED.
    MOVEMENTS.labels(metric_kind, label, "REPLAYED" if movement.replayed else "OK").inc()
    if not movement.replayed and metric_kind in MONEY_KINDS:
        MOVED_MINOR_UNITS.labels(metric_kind, label).inc(movement.transfer.amount)
    on_commit()  # the outbox holds a new event (or, for a replay, nothing new: a spare nudge)
    return movement.transfer


async def _move(movements: Movements, caller: Caller, *, request_id: str, kind: str, owner_id: str | None,
                from_account_id: str | None, to_account_id: str | None, amount: int, currency: str,
                description: str, on_commit: Callable[[], None], hold_seconds: int | None = None) -> Transfer:
    transfer = await _apply(movements, store.MovementRequest(
        initiator=initiator(caller), request_id=request_id, kind=kind, owner_id=owner_id,
        from_account_id=from_account_id, to_account_id=to_account_id, amount=amount, currency=currency,
        description=description, event_headers=events.event_headers(), hold_seconds=hold_seconds,
    ), "HOLD" if hold_seconds is not None else kind, on_commit)
    # A replay of a hold's placement answers as it was first answered: PENDING, the held amount.
    assert transfer.amount == amount and transfer.kind == kind, "a replay must match its request"
    assert (transfer.held_amount is not None) == (hold_seconds is not None), "a hold's replay must be a hold"
    return public(transfer)


async def create_transfer(movements: Movements, caller: Caller, *, request_id: str, from_account_id: str,
                          to_account_id: str, amount: int, currency: str, description: str,
                          on_commit: Callable[[], None] = _nothing, hold_seconds: int | None = None) -> Transfer:
    """Moves amount from one of the caller's accounts to any other customer account; with
    hold_seconds, reserves it instead (a PENDING hold, settled by post_transfer, void_transfer
    or its expiry)."""
    _check_movement_input(request_id, amount, currency, description)
    if hold_seconds is not None and not HOLD_SECONDS_MIN <= hold_seconds <= HOLD_SECONDS_MAX:
        raise invalid("hold_seconds", f"must be {HOLD_SECONDS_MIN} to {HOLD_SECONDS_MAX}")
    if from_account_id == to_account_id:
        raise refused("SAME_ACCOUNT")
    source, target = _account_id(from_account_id), _account_id(to_account_id)
    owner = _customer_id(caller)
    if owner is None:  # a teller owns no account to move money out of
        raise refused("ACCOUNT_NOT_FOUND")
    return await _move(movements, caller, request_id=request_id, kind="TRANSFER", owner_id=owner,
                       from_account_id=source, to_account_id=target, amount=amount, currency=currency,
                       description=description, on_commit=on_commit, hold_seconds=hold_seconds)


async def create_deposit(movements: Movements, caller: Caller, *, request_id: str, account_id: str, amount: int,
                         currency: str, description: str, on_commit: Callable[[], None] = _nothing) -> Transfer:
    """Cash into any customer account, from the currency's cash account. Tellers only (the interceptor checks)."""
    assert caller.role is Role.TELLER
    _check_movement_input(request_id, amount, currency, description)
    return await _move(movements, caller, request_id=request_id, kind="DEPOSIT", owner_id=None, from_account_id=None,
                       to_account_id=_account_id(account_id), amount=amount, currency=currency,
                       description=description, on_commit=on_commit)


async def create_withdrawal(movements: Movements, caller: Caller, *, request_id: str, account_id: str,
                            amount: int, currency: str, description: str,
                            on_commit: Callable[[], None] = _nothing) -> Transfer:
    """Cash out of any customer account, into the currency's cash account. Tellers only."""
    assert caller.role is Role.TELLER
    _check_movement_input(request_id, amount, currency, description)
    return await _move(movements, caller, request_id=request_id, kind="WITHDRAWAL", owner_id=None,
                       from_account_id=_account_id(account_id), to_account_id=None, amount=amount,
                       currency=currency, description=description, on_commit=on_commit)


async def _settle(movements: Movements, caller: Caller, *, kind: str, transfer_id: str, request_id: str,
                  amount: int | None, on_commit: Callable[[], None]) -> Transfer:
    """Posts or voids a hold, as its payee or a teller. Who may, and the hold's state and clock,
    are decided by the ledger under the hold's lock (migrations/0006)."""
    _check_request(request_id, amount)
    hold_id = parse_uuid(transfer_id)
    owner = _customer_id(caller)
    if hold_id is None or (owner is None and not _sees_everything(caller)):
        raise refused("TRANSFER_NOT_FOUND")
    transfer = await _apply(movements, store.MovementRequest(
        initiator=initiator(caller), request_id=request_id, kind=kind, owner_id=owner, from_account_id=None,
        to_account_id=None, amount=amount, currency="", description="", event_headers=events.event_headers(),
        hold_id=str(hold_id)), kind, on_commit)
    assert transfer.transfer_id == str(hold_id) and transfer.held_amount is not None, "a settlement answers its hold"
    assert transfer.status == ("COMPLETED" if kind == "POST" else "VOIDED"), "a settlement answers the state it made"
    assert transfer.amount <= transfer.held_amount and (amount is None or transfer.amount == amount)
    return public(transfer)


async def post_transfer(movements: Movements, caller: Caller, *, transfer_id: str, request_id: str,
                        amount: int | None, on_commit: Callable[[], None] = _nothing) -> Transfer:
    """Takes a PENDING hold: moves amount (None: all of it) to the payee, releases the rest."""
    return await _settle(movements, caller, kind="POST", transfer_id=transfer_id, request_id=request_id,
                         amount=amount, on_commit=on_commit)


async def void_transfer(movements: Movements, caller: Caller, *, transfer_id: str, request_id: str,
                        on_commit: Callable[[], None] = _nothing) -> Transfer:
    """Releases the whole of a PENDING hold; nothing moves."""
    return await _settle(movements, caller, kind="VOID", transfer_id=transfer_id, request_id=request_id,
                         amount=None, on_commit=on_commit)


async def get_transfer(ledger: Ledger, caller: Caller, transfer_id: str) -> Transfer:
    """A movement the caller may see: they own its from or to account (tellers see all)."""
    parsed = parse_uuid(transfer_id)
    if parsed is None:
        raise refused("TRANSFER_NOT_FOUND")
    with _busy_is_unavailable():
        found = await ledger.visible_transfer(str(parsed))
    if found is None:
        raise refused("TRANSFER_NOT_FOUND")
    owner = _customer_id(caller)
    if not _sees_everything(caller) and (owner is None or owner not in (found.from_customer_id, found.to_customer_id)):
        raise refused("TRANSFER_NOT_FOUND")  # someone else's transfer does not exist for this caller
    return public(found.transfer)


def _page_token(account_id: str, last: Transfer) -> str:
    create_time_us = (last.create_time - EPOCH) // timedelta(microseconds=1)
    return pagination.encode_token([account_id, create_time_us, last.transfer_id])


def _page_after(account_id: str, token: str) -> tuple[datetime, str] | None:
    key = pagination.decode_token(token, 3)
    if key is None:
        return None
    token_account, create_time_us, transfer_id = key
    if token_account != account_id or not isinstance(create_time_us, int) or not isinstance(transfer_id, str) \
            or parse_uuid(transfer_id) is None:
        raise pagination.invalid_token()
    return EPOCH + timedelta(microseconds=create_time_us), transfer_id


async def list_transfers(ledger: Ledger, caller: Caller, *, account_id: str, page_size: int,
                         page_token: str) -> tuple[list[Transfer], str]:
    """The movements of one of the caller's accounts (tellers: any account), newest first."""
    size = pagination.page_size(page_size)
    account = _account_id(account_id)
    after = _page_after(account, page_token)
    with _busy_is_unavailable():
        accounts = await ledger.customer_accounts([account])
        if account not in accounts or not (_sees_everything(caller) or accounts[account].customer_id == _customer_id(caller)):
            raise refused("ACCOUNT_NOT_FOUND")
        # One more than the page tells whether another page follows.
        transfers = await ledger.account_transfers(account, after, size + 1)
    page = transfers[:size]
    next_token = _page_token(account, page[-1]) if len(transfers) > size else ""
    return [public(t) for t in page], next_token


async def open_ledger_account(ledger: Ledger, *, account_id: str, customer_id: str,
                              currency: str) -> LedgerAccount:
    """Opens the ledger side of a customer account (svc_account); idempotent for the same parameters."""
    account, customer = parse_uuid(account_id), parse_uuid(customer_id)
    if account is None:
        raise invalid("account_id", "must be a UUID")
    if customer is None:
        raise invalid("customer_id", "must be a UUID")
    if not CURRENCY_CODE.match(currency):
        raise refused("UNSUPPORTED_CURRENCY")
    with _busy_is_unavailable():
        change = await ledger.open_ledger_account(str(account), str(customer), currency)
    if change.error is not None:
        raise refused(change.error)
    assert change.account is not None
    return change.account


async def set_ledger_account_status(ledger: Ledger, *, account_id: str, status: str) -> LedgerAccount:
    """ACTIVE, FROZEN or CLOSED; closing needs a zero balance; CLOSED is final."""
    if status not in ACCOUNT_STATUSES:
        raise invalid("status", "must be ACTIVE, FROZEN or CLOSED")
    account = _account_id(account_id)
    with _busy_is_unavailable():
        change = await ledger.set_ledger_account_status(account, status)
    if change.error is not None:
        raise refused(change.error)
    assert change.account is not None
    return change.account


async def batch_get_ledger_accounts(ledger: Ledger, account_ids: Sequence[str]) -> list[LedgerAccount]:
    """Up to 500 accounts, in request order; all or nothing."""
    if not 1 <= len(account_ids) <= BATCH_GET_SIZE_MAX:
        raise invalid("account_ids", f"must hold 1 to {BATCH_GET_SIZE_MAX} ids")
    wanted = [_account_id(a) for a in account_ids]
    with _busy_is_unavailable():
        found = await ledger.customer_accounts(wanted)
    missing = [a for a in wanted if a not in found]
    if missing:
        error = refused("ACCOUNT_NOT_FOUND")
        error.metadata["account_id"] = missing[0]
        raise error
    return [found[a] for a in wanted]

"""The ledger's events as the outbox relay publishes them.

An operation's outbox rows carry their event ids and Kafka headers but no payload:
move_money_batch (migrations/0006) leaves the bytes out of the lock window. The relay fills them
in here, in its own transaction, from the operation's committed rows (transfer, entries,
owners), with one query for its whole batch.

Bytes built late must equal bytes built at commit, yet a hold's row changes once (PENDING to
COMPLETED, VOIDED or EXPIRED). So each builder reads only columns frozen when its outbox row was
written: HoldPlaced the hold's held_amount, expire_time and create_time (never status or amount,
which a post changes); HoldPosted/Voided/Expired the final status, amount and settle_time (a hold
is settled at most once); MoneyMoved the entries (a post's are written with it, at its time).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from bank.events.v1 import events_pb2
from psycopg import AsyncConnection

from common.grpcutil import timestamp as _timestamp
from svc_transfer import store

MONEY_MOVED = store.MONEY_MOVED
HOLD_PLACED = "bank.events.v1.HoldPlaced"
HOLD_POSTED = "bank.events.v1.HoldPosted"
HOLD_VOIDED = "bank.events.v1.HoldVoided"
HOLD_EXPIRED = "bank.events.v1.HoldExpired"


def money_moved(event: store.LedgerEvent) -> bytes:
    """bank.events.v1.MoneyMoved, of a movement or a posted hold. The cash side shows empty ids and
    a zero balance: consumers never see the cash account. The time is its entries' (a post's for
    a hold, so that a statement orders it where the balance changed)."""
    transfer = event.transfer
    assert event.from_balance_after is not None and event.to_balance_after is not None and event.move_time is not None, \
        f"MoneyMoved {event.event_id} without its entries"
    assert transfer.status == "COMPLETED", f"MoneyMoved {event.event_id} of a {transfer.status} transfer"
    deposit, withdrawal = transfer.kind == "DEPOSIT", transfer.kind == "WITHDRAWAL"
    return events_pb2.MoneyMoved(
        event_id=event.event_id,
        transfer_id=transfer.transfer_id,
        request_id=transfer.request_id,
        kind=events_pb2.MoneyMoved.Kind.Value(transfer.kind),
        from_account_id="" if deposit else transfer.from_account_id,
        from_customer_id=event.from_customer_id or "",
        to_account_id="" if withdrawal else transfer.to_account_id,
        to_customer_id=event.to_customer_id or "",
        amount=transfer.amount,
        currency=transfer.currency,
        from_balance_after=0 if deposit else event.from_balance_after,
        to_balance_after=0 if withdrawal else event.to_balance_after,
        description=transfer.description,
        create_time=_timestamp(event.move_time),
    ).SerializeToString()


def hold_placed(event: store.LedgerEvent) -> bytes:
    """bank.events.v1.HoldPlaced: the frozen columns only (the hold may have settled since)."""
    hold = event.transfer
    assert hold.held_amount is not None and hold.expire_time is not None, f"HoldPlaced {event.event_id} of no hold"
    return events_pb2.HoldPlaced(
        event_id=event.event_id,
        transfer_id=hold.transfer_id,
        request_id=hold.request_id,
        from_account_id=hold.from_account_id,
        from_customer_id=event.from_customer_id or "",
        to_account_id=hold.to_account_id,
        to_customer_id=event.to_customer_id or "",
        held_amount=hold.held_amount,
        currency=hold.currency,
        description=hold.description,
        expire_time=_timestamp(hold.expire_time),
        create_time=_timestamp(hold.create_time),
    ).SerializeToString()


def _settled(event: store.LedgerEvent, status: str) -> dict[str, Any]:
    """The fields every settlement event has (the hold's parties, currency, the settle time),
    once the settled hold is checked against the event's type."""
    hold = event.transfer
    assert hold.status == status and hold.held_amount is not None and event.settle_time is not None, \
        f"{event.event_type} {event.event_id} of a {hold.status} transfer"
    return {"event_id": event.event_id, "transfer_id": hold.transfer_id, "from_account_id": hold.from_account_id,
            "from_customer_id": event.from_customer_id or "", "to_account_id": hold.to_account_id,
            "to_customer_id": event.to_customer_id or "", "held_amount": hold.held_amount, "currency": hold.currency,
            "create_time": _timestamp(event.settle_time)}


def hold_posted(event: store.LedgerEvent) -> bytes:
    """bank.events.v1.HoldPosted: amount moved (its MoneyMoved follows), the rest released."""
    return events_pb2.HoldPosted(amount=event.transfer.amount, **_settled(event, "COMPLETED")).SerializeToString()


def hold_voided(event: store.LedgerEvent) -> bytes:
    """bank.events.v1.HoldVoided: all of the held amount is available to the payer again."""
    return events_pb2.HoldVoided(**_settled(event, "VOIDED")).SerializeToString()


def hold_expired(event: store.LedgerEvent) -> bytes:
    """bank.events.v1.HoldExpired: released at create_time, at or after expire_time."""
    assert event.transfer.expire_time is not None
    return events_pb2.HoldExpired(expire_time=_timestamp(event.transfer.expire_time),
                                  **_settled(event, "EXPIRED")).SerializeToString()


BUILDERS: dict[str, Callable[[store.LedgerEvent], bytes]] = {
    MONEY_MOVED: money_moved,
    HOLD_PLACED: hold_placed,
    HOLD_POSTED: hold_posted,
    HOLD_VOIDED: hold_voided,
    HOLD_EXPIRED: hold_expired,
}


async def payloads(conn: AsyncConnection, event_ids: Sequence[str]) -> dict[str, bytes]:
    """The payloads of these outbox events (the ledger's, without bytes of their own), by event id.
    A type without a builder is a KeyError: the relay's batch fails loudly, nothing is marked sent."""
    return {event.event_id: BUILDERS[event.event_type](event) for event in await store.ledger_events(conn, event_ids)}

"""The ledger's events as the outbox relay publishes them.

A movement's outbox row carries its event id and Kafka headers but no payload: move_money_batch
(migrations/0005) leaves the bytes out of the lock window. The relay fills them in here, in its
own transaction, from the movement's committed rows (transfer, entries, owners), with one query
for its whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence

from bank.events.v1 import events_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from psycopg import AsyncConnection

from svc_transfer import store

MONEY_MOVED = "bank.events.v1.MoneyMoved"


def money_moved(event: store.MovedEvent) -> bytes:
    """bank.events.v1.MoneyMoved. The cash side shows empty ids and a zero balance: consumers
    never see the cash account."""
    transfer = event.transfer
    create_time = Timestamp()
    create_time.FromDatetime(transfer.create_time)
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
        create_time=create_time,
    ).SerializeToString()


async def payloads(conn: AsyncConnection, event_ids: Sequence[str]) -> dict[str, bytes]:
    """The payloads of these outbox events (MoneyMoved, without bytes of their own), by event id."""
    return {event.event_id: money_moved(event) for event in await store.moved_events(conn, event_ids)}

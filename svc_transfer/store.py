"""The only SQL of svc_transfer. Returns plain values.

Every write is one call of a function of migrations/ (movements: move_money_batch of 0005, many
movements of any callers in one transaction; see batching.py), sent in ONE round trip as a
prepared statement on an autocommit connection, which Postgres runs as one implicit
transaction. Reads go the same way. Every statement is bounded by the pool's statement_timeout
(common/db.py), every lock wait of a ledger function by its own lock_timeout (1 s).

Business refusals come back as a reason code in the result's `error` field; only operating
errors (lock wait or statement timed out, pool exhausted, connection lost) raise, as LedgerBusy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from common.db import TRANSIENT_ERRORS as PG_TRANSIENT_ERRORS
from common.ids import new_id


class LedgerBusy(Exception):
    """An operating error: a lock wait or the statement timed out, no connection was free, or the
    connection failed (Postgres restarted, the backend was terminated). Nothing was written,
    except when a connection is lost during the commit, where the movements may have committed:
    either way a retry with the same request_id moves money at most once."""


@dataclass(frozen=True)
class LedgerAccount:
    account_id: str
    customer_id: str
    currency: str
    status: str  # ACTIVE, FROZEN, CLOSED
    balance: int
    create_time: datetime


@dataclass(frozen=True)
class Transfer:
    transfer_id: str
    kind: str  # TRANSFER, DEPOSIT, WITHDRAWAL
    request_id: str
    from_account_id: str  # the ledger's ids: the cash account's too
    to_account_id: str
    amount: int
    currency: str
    description: str
    create_time: datetime


@dataclass(frozen=True)
class Movement:
    error: str | None  # a reason code of API.md; None when money moved (or had moved)
    replayed: bool  # an idempotent retry: the original transfer, nothing moved now
    transfer: Transfer | None


@dataclass(frozen=True)
class AccountChange:
    error: str | None
    account: LedgerAccount | None


@dataclass(frozen=True)
class VisibleTransfer:
    transfer: Transfer
    from_customer_id: str | None  # None for the cash account
    to_customer_id: str | None


async def _fetch(pool: AsyncConnectionPool, query: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    try:
        async with pool.connection() as conn:
            conn: AsyncConnection  # type: ignore[no-redef]
            await conn.set_autocommit(True)
            # Prepared on its first use on each connection: later calls skip parsing and planning.
            cursor = await conn.execute(query, params, prepare=True)  # type: ignore[arg-type]  # our own SQL
            return await cursor.fetchall()
    # The timeouts, a lost or terminated connection (the pool replaces it once it is returned),
    # a deadlock, no free connection: common/db.py's list.
    except PG_TRANSIENT_ERRORS as exc:
        raise LedgerBusy(str(exc)) from exc


def _transfer(row: Sequence[Any]) -> Transfer:
    transfer_id, kind, request_id, from_id, to_id, amount, currency, description, create_time = row
    return Transfer(str(transfer_id), kind, request_id, str(from_id), str(to_id), amount, currency, description, create_time)


def _account(row: Sequence[Any]) -> LedgerAccount:
    account_id, customer_id, currency, status, balance, create_time = row
    return LedgerAccount(str(account_id), str(customer_id), currency, status, balance, create_time)


@dataclass(frozen=True)
class MovementRequest:
    """One movement of move_money_batch: a TRANSFER, a DEPOSIT (no from account) or a WITHDRAWAL (no to account)."""
    initiator: str
    request_id: str
    kind: str
    owner_id: str | None
    from_account_id: str | None
    to_account_id: str | None
    amount: int
    currency: str
    description: str
    event_headers: Mapping[str, str]  # the Kafka headers of its event: request_id, traceparent, ...


def _event_headers_json(headers: Mapping[str, str]) -> str:
    """The Kafka headers of a movement's event as the outbox stores them: the non-empty ones."""
    return orjson.dumps({key: value for key, value in headers.items() if value}).decode()


async def move_money_batch(pool: AsyncConnectionPool, requests: Sequence[MovementRequest]) -> list[Movement]:
    """The movements in one transaction and one round trip (migrations/0005), one result each, in order.

    The ids of the transfer and of its event are made here, outside the lock window; a replayed
    or refused movement leaves them unused."""
    columns = list(zip(*((r.initiator, r.request_id, r.kind, r.owner_id, r.from_account_id, r.to_account_id,
                          r.amount, r.currency, r.description, _event_headers_json(r.event_headers),
                          new_id(), new_id()) for r in requests), strict=True))
    rows = await _fetch(
        pool,
        # Ids as text: the caller wants strings, and uuid.UUID objects cost more to make and format.
        # The arrays go in binary (%b): psycopg writes a text array literal with a regex per
        # element, 3x the cost (measured: 2.4 ms against 0.7 ms for 12 arrays of 64).
        "SELECT ordinal, error, replayed, transfer_id::text, kind, request_id, from_account_id::text,"
        " to_account_id::text, amount, currency, description, create_time"
        " FROM move_money_batch(%b::text[], %b::text[], %b::text[], %b::uuid[], %b::uuid[], %b::uuid[],"
        " %b::bigint[], %b::text[], %b::text[], %b::jsonb[], %b::uuid[], %b::uuid[])",
        [list(column) for column in columns],
    )
    assert [row[0] for row in rows] == list(range(1, len(requests) + 1)), "a movement without its result"
    movements = []
    for _, error, replayed, *transfer in rows:
        movements.append(Movement(error, False, None) if error is not None
                         else Movement(None, bool(replayed), _transfer(transfer)))
    return movements


@dataclass(frozen=True)
class MovedEvent:
    """What a MoneyMoved event says, read from the committed rows of its movement."""
    event_id: str
    transfer: Transfer
    from_customer_id: str | None  # None for the cash account
    to_customer_id: str | None
    from_balance_after: int
    to_balance_after: int


async def moved_events(conn: AsyncConnection, event_ids: Sequence[str]) -> list[MovedEvent]:
    """The movements behind these outbox events (the relay's batch, its transaction), any order."""
    cursor = await conn.execute(
        "SELECT o.event_id::text, t.transfer_id::text, t.kind, t.request_id, t.from_account_id::text,"
        " t.to_account_id::text, t.amount, t.currency, t.description, t.create_time, fa.customer_id::text,"
        " ta.customer_id::text, fe.balance_after, te.balance_after"
        " FROM outbox o JOIN transfers t ON t.transfer_id = o.aggregate_id::uuid"
        " JOIN entries fe ON fe.transfer_id = t.transfer_id AND fe.account_id = t.from_account_id"
        " JOIN entries te ON te.transfer_id = t.transfer_id AND te.account_id = t.to_account_id"
        " JOIN ledger_accounts fa ON fa.account_id = t.from_account_id"
        " JOIN ledger_accounts ta ON ta.account_id = t.to_account_id"
        " WHERE o.event_id = ANY(%s::uuid[])",
        (list(event_ids),),
    )
    found = []
    for event_id, *transfer, from_customer, to_customer, from_after, to_after in await cursor.fetchall():
        found.append(MovedEvent(event_id, _transfer(transfer), from_customer, to_customer, from_after, to_after))
    return found


class LedgerStore:
    """The ledger's accounts and the reads of its movements (writes of movements go in batches:
    move_money_batch and batching.py). The use cases take it, or the fake of tests/unit."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def open_ledger_account(self, account_id: str, customer_id: str, currency: str) -> AccountChange:
        rows = await _fetch(self._pool, "SELECT * FROM open_ledger_account(%s::uuid, %s::uuid, %s)",
                            (account_id, customer_id, currency))
        [(error, *account)] = rows
        return AccountChange(error, None if error is not None else _account(account))

    async def set_ledger_account_status(self, account_id: str, status: str) -> AccountChange:
        rows = await _fetch(self._pool, "SELECT * FROM set_ledger_account_status(%s::uuid, %s)", (account_id, status))
        [(error, *account)] = rows
        return AccountChange(error, None if error is not None else _account(account))

    async def customer_accounts(self, account_ids: Sequence[str]) -> dict[str, LedgerAccount]:
        """The customer accounts among account_ids (cash accounts are never returned), by id."""
        rows = await _fetch(
            self._pool,
            "SELECT account_id, customer_id, currency, status, balance, create_time FROM ledger_accounts"
            " WHERE account_id = ANY(%s::uuid[]) AND kind = 'CUSTOMER'",
            (list(account_ids),),
        )
        accounts = [_account(row) for row in rows]
        return {a.account_id: a for a in accounts}

    async def visible_transfer(self, transfer_id: str) -> VisibleTransfer | None:
        rows = await _fetch(
            self._pool,
            "SELECT t.transfer_id, t.kind, t.request_id, t.from_account_id, t.to_account_id, t.amount, t.currency,"
            " t.description, t.create_time, f.customer_id, t2.customer_id FROM transfers t"
            " JOIN ledger_accounts f ON f.account_id = t.from_account_id"
            " JOIN ledger_accounts t2 ON t2.account_id = t.to_account_id"
            " WHERE t.transfer_id = %s::uuid",
            (transfer_id,),
        )
        if not rows:
            return None
        [(*transfer, from_customer_id, to_customer_id)] = rows
        return VisibleTransfer(
            _transfer(transfer),
            None if from_customer_id is None else str(from_customer_id),
            None if to_customer_id is None else str(to_customer_id),
        )

    async def account_transfers(self, account_id: str, after: tuple[datetime, str] | None, limit: int) -> list[Transfer]:
        """One account's movements, newest first, strictly after the keyset `after` (create_time, transfer_id)."""
        after_time, after_id = after if after is not None else (None, None)
        # Bound client-side, the NULL keyset of the first page is a constant the planner drops.
        rows = await _fetch(
            self._pool,
            "SELECT t.transfer_id, t.kind, t.request_id, t.from_account_id, t.to_account_id, t.amount, t.currency,"
            " t.description, t.create_time FROM entries e JOIN transfers t ON t.transfer_id = e.transfer_id"
            " WHERE e.account_id = %s::uuid"
            " AND (%s::timestamptz IS NULL OR (e.create_time, e.transfer_id) < (%s::timestamptz, %s::uuid))"
            " ORDER BY e.create_time DESC, e.transfer_id DESC LIMIT %s",
            (account_id, after_time, after_time, after_id, limit),
        )
        return [_transfer(row) for row in rows]

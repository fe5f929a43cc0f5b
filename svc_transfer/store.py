"""The only SQL of svc_transfer. Returns plain values.

Every write is one call of a function of migrations/ (movements: move_money_batch of 0006, many
movements of any callers in one transaction, see batching.py; the release of lapsed holds:
release_lapsed_holds of 0006), sent in ONE round trip as a
prepared statement on an autocommit connection, which Postgres runs as one implicit
transaction. Reads go the same way. Every statement is bounded by the pool's statement_timeout
(common/db.py), every lock wait of a ledger function by its own lock_timeout (1 s).

Business refusals come back as a reason code in the result's `error` field; only operating
errors (lock wait or statement timed out, pool exhausted, connection lost, no answer within
CALL_DEADLINE_S) raise, as LedgerBusy: the outcome is unknown (a lost connection or a deadline may
come after the commit), and a retry with the same request_id moves money at most once.
"""

from __future__ import annotations

import asyncio
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
    pending_debits: int = 0  # the sum of its PENDING holds as payer

    @property
    def available_balance(self) -> int:
        """What transfers, withdrawals and new holds may take: the balance less what holds reserve."""
        return self.balance - self.pending_debits


@dataclass(frozen=True)
class Transfer:
    transfer_id: str
    kind: str  # TRANSFER, DEPOSIT, WITHDRAWAL (a hold is a TRANSFER with held_amount set)
    request_id: str
    from_account_id: str  # the ledger's ids: the cash account's too
    to_account_id: str
    amount: int  # a hold's: held_amount while PENDING, VOIDED or EXPIRED; the amount moved once COMPLETED
    currency: str
    description: str
    create_time: datetime
    status: str = "COMPLETED"  # PENDING, COMPLETED, VOIDED, EXPIRED
    held_amount: int | None = None  # None: never a hold
    expire_time: datetime | None = None


@dataclass(frozen=True)
class Movement:
    error: str | None  # a reason code of API.md; None when money moved (or had moved)
    replayed: bool  # an idempotent retry: the original transfer, nothing moved now
    transfer: Transfer | None  # a POST's or VOID's: the hold, with its new status and amount
    status: str | None = None  # the hold's status on a TRANSFER_NOT_PENDING refusal


@dataclass(frozen=True)
class AccountChange:
    error: str | None
    account: LedgerAccount | None


@dataclass(frozen=True)
class VisibleTransfer:
    transfer: Transfer
    from_customer_id: str | None  # None for the cash account
    to_customer_id: str | None


# A call's whole time, the commit included. statement_timeout and lock_timeout bound the work,
# but not a commit waiting for a synchronous standby (the HA mode, issue #19: with
# synchronous_mode_strict and no standby left, it waits forever). Past this the caller gets
# LedgerBusy, never a refusal: the movements may have committed (the cancel that ends the wait
# leaves a local commit in place), and a retry with the same request_id tells. Below Envoy's
# route timeout (10 s), so the client hears 503 LEDGER_BUSY rather than 504.
CALL_DEADLINE_S = 8.0


async def _fetch(pool: AsyncConnectionPool, query: str, params: Sequence[Any],
                 timeout_s: float | None = None) -> list[tuple[Any, ...]]:
    """The rows of one call, within timeout_s (CALL_DEADLINE_S when None)."""
    limit_s = CALL_DEADLINE_S if timeout_s is None else timeout_s
    try:
        async with asyncio.timeout(limit_s), pool.connection() as conn:
            conn: AsyncConnection  # type: ignore[no-redef]
            await conn.set_autocommit(True)
            # Prepared on its first use on each connection: later calls skip parsing and planning.
            cursor = await conn.execute(query, params, prepare=True)  # type: ignore[arg-type]  # our own SQL
            return await cursor.fetchall()
    # The timeouts, a lost or terminated connection (the pool replaces it once it is returned),
    # a deadlock, no free connection: common/db.py's list.
    except PG_TRANSIENT_ERRORS as exc:
        raise LedgerBusy(str(exc)) from exc
    except TimeoutError as exc:
        raise LedgerBusy(f"no answer within {limit_s:.3g} s; the outcome is unknown") from exc


# The columns of a transfer in the rows of the ledger's functions and reads, in this order.
_TRANSFER_COLUMNS = ("transfer_id", "kind", "request_id", "from_account_id", "to_account_id", "amount", "currency",
                     "description", "create_time", "status", "held_amount", "expire_time")
_STATUS_AT = _TRANSFER_COLUMNS.index("status")


def _transfer(row: Sequence[Any]) -> Transfer:
    (transfer_id, kind, request_id, from_id, to_id, amount, currency, description, create_time, status, held_amount,
     expire_time) = row
    return Transfer(str(transfer_id), kind, request_id, str(from_id), str(to_id), amount, currency, description,
                    create_time, status, held_amount, expire_time)


def _account(row: Sequence[Any]) -> LedgerAccount:
    account_id, customer_id, currency, status, balance, create_time, pending_debits = row
    return LedgerAccount(str(account_id), str(customer_id), currency, status, balance, create_time, pending_debits)


@dataclass(frozen=True)
class MovementRequest:
    """One movement of move_money_batch: a TRANSFER (a hold with hold_seconds), a DEPOSIT (no from
    account), a WITHDRAWAL (no to account), or the POST or VOID of the hold hold_id (no accounts,
    currency "", description ""; owner_id: the calling customer, None for tellers)."""
    initiator: str
    request_id: str
    kind: str  # TRANSFER, DEPOSIT, WITHDRAWAL, POST, VOID
    owner_id: str | None
    from_account_id: str | None
    to_account_id: str | None
    amount: int | None  # None only for a POST of the whole held amount, and a VOID
    currency: str
    description: str
    event_headers: Mapping[str, str]  # the Kafka headers of its events: request_id, traceparent, ...
    hold_seconds: int | None = None  # a TRANSFER: makes it a hold lasting this long
    hold_id: str | None = None  # a POST or VOID: the hold's transfer_id


def _event_headers_json(headers: Mapping[str, str]) -> str:
    """The Kafka headers of a movement's event as the outbox stores them: the non-empty ones."""
    return orjson.dumps({key: value for key, value in headers.items() if value}).decode()


SETTLEMENTS = frozenset({"POST", "VOID"})


def _movements(rows: Sequence[Sequence[Any]]) -> list[Movement]:
    movements = []
    for _, error, replayed, *transfer in rows:
        if error is None:
            movements.append(Movement(None, bool(replayed), _transfer(transfer)))
        else:
            # Only a TRANSFER_NOT_PENDING comes back with a status (the hold's): its message names it.
            movements.append(Movement(error, False, None, transfer[_STATUS_AT]))
    return movements


# Ids as text: the caller wants strings, and uuid.UUID objects cost more to make and format. The
# arrays go in binary (%b): psycopg writes a text array literal with a regex per element, 3x the
# cost (measured: 2.4 ms against 0.7 ms for 12 arrays of 64).
MOVE_MONEY_BATCH = (
    "SELECT ordinal, error, replayed, transfer_id::text, kind, request_id, from_account_id::text,"
    " to_account_id::text, amount, currency, description, create_time, status, held_amount, expire_time"
    " FROM move_money_batch(%b::text[], %b::text[], %b::text[], %b::uuid[], %b::uuid[], %b::uuid[],"
    " %b::bigint[], %b::text[], %b::text[], %b::jsonb[], %b::uuid[], %b::uuid[], %b::int[], %b::uuid[],"
    " %b::uuid[])")


def batch_params(requests: Sequence[MovementRequest]) -> list[Any]:
    """MOVE_MONEY_BATCH's parameters for these movements (migrations/0006).

    The ids are made here, outside the lock window: a new transfer's (none for a POST or VOID,
    whose result is the hold) and its event's, and a POST's second one (its MoneyMoved; the
    first is its HoldPosted's). A replayed or refused movement leaves them unused."""
    columns = list(zip(*((r.initiator, r.request_id, r.kind, r.owner_id, r.from_account_id, r.to_account_id,
                          r.amount, r.currency, r.description, _event_headers_json(r.event_headers),
                          None if r.kind in SETTLEMENTS else new_id(), new_id()) for r in requests), strict=True))
    params: list[Any] = [list(column) for column in columns]
    # The hold arrays only when some movement uses them: NULL reads as all-NULL, and a plain
    # batch then sends what it sent before holds.
    holds = any(r.hold_seconds is not None or r.hold_id is not None for r in requests)
    params.append([r.hold_seconds for r in requests] if holds else None)
    params.append([r.hold_id for r in requests] if holds else None)
    params.append([new_id() if r.kind == "POST" else None for r in requests] if holds else None)
    return params


def batch_results(requests: Sequence[MovementRequest], rows: Sequence[Sequence[Any]]) -> list[Movement]:
    """One result per movement of MOVE_MONEY_BATCH, in the order of the requests."""
    assert [row[0] for row in rows] == list(range(1, len(requests) + 1)), "a movement without its result"
    return _movements(rows)


async def move_money_batch(pool: AsyncConnectionPool, requests: Sequence[MovementRequest],
                           timeout_s: float | None = None) -> list[Movement]:
    """The movements in one transaction and one round trip, one result each, in order;
    LedgerBusy past timeout_s (CALL_DEADLINE_S when None)."""
    rows = await _fetch(pool, MOVE_MONEY_BATCH, batch_params(requests), timeout_s)
    return batch_results(requests, rows)


async def release_lapsed_holds(pool: AsyncConnectionPool, limit: int) -> list[Movement]:
    """Expires up to `limit` of the oldest lapsed PENDING holds (migrations/0006), in one
    transaction: one result per hold claimed (none when none had lapsed, or every lapsed one was
    locked by someone else). A result's error is HOLD_NOT_LAPSED only if the database's clock
    went back between the claim and the decision: the hold is left for the next call."""
    assert 1 <= limit <= 256, f"release_lapsed_holds: limit {limit}"
    rows = await _fetch(
        pool,
        "SELECT ordinal, error, replayed, transfer_id::text, kind, request_id, from_account_id::text,"
        " to_account_id::text, amount, currency, description, create_time, status, held_amount, expire_time"
        " FROM release_lapsed_holds(%s, %b::uuid[])",
        (limit, [new_id() for _ in range(limit)]),
    )
    assert [row[0] for row in rows] == list(range(1, len(rows) + 1)), "a release without its result"
    return _movements(rows)


async def holds_release_lag_s(pool: AsyncConnectionPool) -> float:
    """How long the oldest lapsed, still PENDING hold has waited for its release (0: none waits)."""
    [(lag_s,)] = await _fetch(
        pool,
        "SELECT coalesce(extract(epoch FROM clock_timestamp() - min(expire_time)), 0)::float8 FROM transfers"
        " WHERE status = 'PENDING' AND expire_time <= clock_timestamp()",
        (),
    )
    return float(lag_s)


@dataclass(frozen=True)
class LedgerEvent:
    """What a ledger event says, read from the committed rows of its operation. Its builder reads
    only what was frozen when its outbox row was written (events.py)."""
    event_id: str
    event_type: str  # bank.events.v1.MoneyMoved, HoldPlaced, HoldPosted, HoldVoided, HoldExpired
    transfer: Transfer  # the transfer or the hold, as it is now
    from_customer_id: str | None  # None for the cash account
    to_customer_id: str | None
    settle_time: datetime | None  # a hold's: when it left PENDING
    # MoneyMoved only, from its entries: the balances after it and its time (a post's, for a hold).
    from_balance_after: int | None
    to_balance_after: int | None
    move_time: datetime | None


MONEY_MOVED = "bank.events.v1.MoneyMoved"


async def ledger_events(conn: AsyncConnection, event_ids: Sequence[str]) -> list[LedgerEvent]:
    """The operations behind these outbox events (the relay's batch, its transaction), any order."""
    cursor = await conn.execute(
        "SELECT o.event_id::text, o.event_type, t.transfer_id::text, t.kind, t.request_id, t.from_account_id::text,"
        " t.to_account_id::text, t.amount, t.currency, t.description, t.create_time, t.status, t.held_amount,"
        " t.expire_time, fa.customer_id::text, ta.customer_id::text, t.settle_time, fe.balance_after, te.balance_after, fe.create_time"
        " FROM outbox o JOIN transfers t ON t.transfer_id = o.aggregate_id::uuid"
        " JOIN ledger_accounts fa ON fa.account_id = t.from_account_id"
        " JOIN ledger_accounts ta ON ta.account_id = t.to_account_id"
        # Entries exist for a movement and a posted hold; only a MoneyMoved reads them.
        " LEFT JOIN entries fe ON o.event_type = %s AND fe.transfer_id = t.transfer_id"
        " AND fe.account_id = t.from_account_id"
        " LEFT JOIN entries te ON o.event_type = %s AND te.transfer_id = t.transfer_id"
        " AND te.account_id = t.to_account_id"
        " WHERE o.event_id = ANY(%s::uuid[])",
        (MONEY_MOVED, MONEY_MOVED, list(event_ids)),
    )
    found = []
    for row in await cursor.fetchall():
        event_id, event_type, *rest = row
        transfer, (from_customer, to_customer, settle_time, from_after, to_after, move_time) = rest[:12], rest[12:]
        found.append(LedgerEvent(event_id, event_type, _transfer(transfer), from_customer, to_customer, settle_time,
                                 from_after, to_after, move_time))
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
            "SELECT account_id, customer_id, currency, status, balance, create_time, pending_debits FROM ledger_accounts"
            " WHERE account_id = ANY(%s::uuid[]) AND kind = 'CUSTOMER'",
            (list(account_ids),),
        )
        accounts = [_account(row) for row in rows]
        return {a.account_id: a for a in accounts}

    async def visible_transfer(self, transfer_id: str) -> VisibleTransfer | None:
        rows = await _fetch(
            self._pool,
            "SELECT t.transfer_id, t.kind, t.request_id, t.from_account_id, t.to_account_id, t.amount, t.currency,"
            " t.description, t.create_time, t.status, t.held_amount, t.expire_time, f.customer_id, t2.customer_id"
            " FROM transfers t"
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
        """One account's movements and holds (in every status), newest first, strictly after the
        keyset `after` (create_time, transfer_id).

        Three keyset branches, each bounded by the limit, merged: the account's entries whose
        transfer is no hold, and its holds as payer and as payee (holds_by_payer/_payee: a hold has
        no entries until posted). Every row is keyed by its transfer's create_time, which never
        changes: a hold posted between two pages does not move."""
        after_time, after_id = after if after is not None else (None, None)
        # Bound client-side, the NULL keyset of the first page is a constant the planner drops.
        rows = await _fetch(
            self._pool,
            "SELECT t.transfer_id, t.kind, t.request_id, t.from_account_id, t.to_account_id, t.amount, t.currency,"
            " t.description, t.create_time, t.status, t.held_amount, t.expire_time FROM ("
            " (SELECT e.transfer_id FROM entries e JOIN transfers h ON h.transfer_id = e.transfer_id"
            "   WHERE e.account_id = %s::uuid AND h.held_amount IS NULL"
            "     AND (%s::timestamptz IS NULL OR (e.create_time, e.transfer_id) < (%s::timestamptz, %s::uuid))"
            "   ORDER BY e.create_time DESC, e.transfer_id DESC LIMIT %s)"
            " UNION ALL"
            " (SELECT h.transfer_id FROM transfers h"
            "   WHERE h.from_account_id = %s::uuid AND h.held_amount IS NOT NULL"
            "     AND (%s::timestamptz IS NULL OR (h.create_time, h.transfer_id) < (%s::timestamptz, %s::uuid))"
            "   ORDER BY h.create_time DESC, h.transfer_id DESC LIMIT %s)"
            " UNION ALL"
            " (SELECT h.transfer_id FROM transfers h"
            "   WHERE h.to_account_id = %s::uuid AND h.held_amount IS NOT NULL"
            "     AND (%s::timestamptz IS NULL OR (h.create_time, h.transfer_id) < (%s::timestamptz, %s::uuid))"
            "   ORDER BY h.create_time DESC, h.transfer_id DESC LIMIT %s)"
            ") AS page JOIN transfers t ON t.transfer_id = page.transfer_id"
            " ORDER BY t.create_time DESC, t.transfer_id DESC LIMIT %s",
            (account_id, after_time, after_time, after_id, limit) * 3 + (limit,),
        )
        return [_transfer(row) for row in rows]

"""svc_account's SQL and CQL: the only place that knows its tables (Postgres schema account,
Cassandra keyspace bank_account). Returns plain values; retries are the caller's."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from cassandra import ConsistencyLevel
from cassandra.cluster import Session
from cassandra.query import PreparedStatement
from psycopg.rows import class_row
from psycopg_pool import AsyncConnectionPool

from common import cassandra
from common.config import Settings


@dataclass(frozen=True)
class Account:
    account_id: UUID
    customer_id: UUID
    currency: str
    status: str
    create_time: datetime


class AccountStore:
    """Who owns which account (Postgres, schema account). The use cases take it, or the fake of
    tests/unit; each call takes a pooled connection for one statement."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def insert_account(self, account_id: UUID, customer_id: UUID, currency: str) -> Account:
        async with self._pool.connection() as conn:
            cursor = conn.cursor(row_factory=class_row(Account))
            await cursor.execute(
                "INSERT INTO accounts (account_id, customer_id, currency) VALUES (%s, %s, %s)"
                " RETURNING account_id, customer_id, currency, status, create_time",
                (account_id, customer_id, currency),
            )
            row = await cursor.fetchone()
        assert row is not None, "INSERT ... RETURNING returned no row"
        return row

    async def get_account(self, account_id: UUID) -> Account | None:
        async with self._pool.connection() as conn:
            cursor = conn.cursor(row_factory=class_row(Account))
            await cursor.execute(
                "SELECT account_id, customer_id, currency, status, create_time FROM accounts WHERE account_id = %s",
                (account_id,),
            )
            return await cursor.fetchone()

    async def list_accounts(self, customer_id: UUID, after: tuple[datetime, UUID] | None, limit: int) -> list[Account]:
        """A customer's accounts, newest first, after the keyset (create_time, account_id)."""
        async with self._pool.connection() as conn:
            cursor = conn.cursor(row_factory=class_row(Account))
            if after is None:
                await cursor.execute(
                    "SELECT account_id, customer_id, currency, status, create_time FROM accounts WHERE customer_id = %s"
                    " ORDER BY create_time DESC, account_id DESC LIMIT %s",
                    (customer_id, limit),
                )
            else:
                await cursor.execute(
                    "SELECT account_id, customer_id, currency, status, create_time FROM accounts"
                    " WHERE customer_id = %s AND (create_time, account_id) < (%s, %s)"
                    " ORDER BY create_time DESC, account_id DESC LIMIT %s",
                    (customer_id, after[0], after[1], limit),
                )
            return await cursor.fetchall()

    async def set_status(self, account_id: UUID, status: str) -> None:
        async with self._pool.connection() as conn:
            await conn.execute("UPDATE accounts SET status = %s WHERE account_id = %s", (status, account_id))


# --- Cassandra: statements (keyspace bank_account) -------------------------------------------

KEYSPACE = "bank_account"  # spelled out in every statement below and in cql/: no session-wide USE
CQL_DIR = Path(__file__).parent / "cql"
MONTHS_MEMO_MAX = 100_000  # (account, month) pairs known written; about 10 MB at most


TRANSIENT_ERRORS: tuple[type[Exception], ...] = (*cassandra.TRANSIENT_ERRORS, cassandra.NotConnected)


@dataclass(frozen=True)
class Activity:
    account_id: UUID
    month: int  # yyyymm of create_time, UTC
    create_time: datetime  # UTC, millisecond precision (Cassandra's timestamp)
    activity_id: UUID
    transfer_id: str
    kind: str  # a bank.account.v1.Activity.Kind name
    amount: int  # signed: positive in, negative out
    currency: str
    balance_after: int
    counterparty_account_id: str
    description: str


def _activity(row: dict[str, Any]) -> Activity:
    create_time = row["create_time"]
    create_time = create_time.replace(tzinfo=UTC) if create_time.tzinfo is None else create_time.astimezone(UTC)
    return Activity(account_id=row["account_id"], month=row["month"], create_time=create_time,
                    activity_id=row["activity_id"], transfer_id=row["transfer_id"], kind=row["kind"],
                    amount=row["amount"], currency=row["currency"], balance_after=row["balance_after"],
                    counterparty_account_id=row["counterparty_account_id"] or "", description=row["description"] or "")


@dataclass(frozen=True)
class _Statements:
    put_month: PreparedStatement
    put_activity: PreparedStatement
    months: PreparedStatement
    months_up_to: PreparedStatement
    first_page: PreparedStatement
    page_after: PreparedStatement


class ActivityStore:
    """Started as a worker of the service (connects Cassandra and applies the CQL files)."""

    def __init__(self, settings: Settings, pool: AsyncConnectionPool) -> None:
        self._keyspace = cassandra.Keyspace(settings, pool, KEYSPACE, CQL_DIR, self._prepare, "the history store")
        self._months_written: set[tuple[UUID, int]] = set()
        self._writes = cassandra.WriteCoalescer(lambda: self._cql()[0])

    async def start(self) -> None:
        await self._keyspace.start()

    async def stop(self) -> None:
        await self._keyspace.stop()

    @staticmethod
    async def _prepare(session: Session) -> _Statements:
        # LOCAL_QUORUM for writes and reads: a statement read after the projection wrote it sees it.
        quorum = ConsistencyLevel.LOCAL_QUORUM
        return _Statements(
            put_month=await cassandra.prepare(
                session, "INSERT INTO bank_account.activity_months (account_id, month) VALUES (?, ?)",
                consistency_level=quorum),
            put_activity=await cassandra.prepare(
                session, "INSERT INTO bank_account.activity_by_month (account_id, month, create_time, activity_id, transfer_id, kind,"
                         " amount, currency, balance_after, counterparty_account_id, description)"
                         " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                consistency_level=quorum),
            months=await cassandra.prepare(
                session, "SELECT month FROM bank_account.activity_months WHERE account_id = ? LIMIT ?",
                consistency_level=quorum),
            months_up_to=await cassandra.prepare(
                session, "SELECT month FROM bank_account.activity_months WHERE account_id = ? AND month <= ? LIMIT ?",
                consistency_level=quorum),
            first_page=await cassandra.prepare(
                session, "SELECT account_id, month, create_time, activity_id, transfer_id, kind, amount, currency, balance_after,"
                         " counterparty_account_id, description FROM bank_account.activity_by_month"
                         " WHERE account_id = ? AND month = ? LIMIT ?",
                consistency_level=quorum),
            page_after=await cassandra.prepare(
                session, "SELECT account_id, month, create_time, activity_id, transfer_id, kind, amount, currency, balance_after,"
                         " counterparty_account_id, description FROM bank_account.activity_by_month"
                         " WHERE account_id = ? AND month = ? AND (create_time, activity_id) < (?, ?) LIMIT ?",
                consistency_level=quorum),
        )

    def _cql(self) -> tuple[Session, _Statements]:
        return self._keyspace.session()

    async def put_activities(self, lines: list[Activity]) -> None:
        """Write the lines, each month first (a line is never in a month the reader cannot find);
        idempotent: the same lines again change nothing. Months already written by this process
        are skipped (a bounded memo). The lines of the events handled side by side (a consumer
        batch) are written together, in unlogged batches (cassandra.WriteCoalescer)."""
        _, statements = self._cql()
        months = sorted({(a.account_id, a.month) for a in lines} - self._months_written)
        await self._writes.write([(statements.put_month, key) for key in months])
        if len(self._months_written) + len(months) > MONTHS_MEMO_MAX:
            self._months_written.clear()
        self._months_written.update(months)
        await self._writes.write([(statements.put_activity, (
            a.account_id, a.month, a.create_time, a.activity_id, a.transfer_id, a.kind, a.amount, a.currency,
            a.balance_after, a.counterparty_account_id, a.description)) for a in lines])

    async def months(self, account_id: UUID, up_to: int | None, limit: int) -> list[int]:
        """The account's months with activity, newest first, not after up_to."""
        session, statements = self._cql()
        if up_to is None:
            result = await cassandra.execute(session, statements.months, (account_id, limit))
        else:
            result = await cassandra.execute(session, statements.months_up_to, (account_id, up_to, limit))
        return [int(row["month"]) for row in result.current_rows]

    async def month_page(self, account_id: UUID, month: int, after: tuple[datetime, UUID] | None,
                         limit: int) -> list[Activity]:
        """Up to limit lines of one month, newest first, strictly after the key `after`."""
        session, statements = self._cql()
        if after is None:
            result = await cassandra.execute(session, statements.first_page, (account_id, month, limit))
        else:
            result = await cassandra.execute(session, statements.page_after, (account_id, month, after[0], after[1], limit))
        return [_activity(row) for row in result.current_rows]

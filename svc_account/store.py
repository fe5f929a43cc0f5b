"""svc_account's SQL: the only place that knows its tables."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from psycopg import AsyncConnection
from psycopg.rows import class_row


@dataclass(frozen=True)
class Account:
    account_id: UUID
    customer_id: UUID
    currency: str
    status: str
    create_time: datetime




async def insert_account(conn: AsyncConnection, account_id: UUID, customer_id: UUID, currency: str) -> Account:
    cursor = conn.cursor(row_factory=class_row(Account))
    await cursor.execute(
        "INSERT INTO accounts (account_id, customer_id, currency) VALUES (%s, %s, %s)"
        " RETURNING account_id, customer_id, currency, status, create_time",
        (account_id, customer_id, currency),
    )
    row = await cursor.fetchone()
    assert row is not None
    return row


async def get_account(conn: AsyncConnection, account_id: UUID) -> Account | None:
    cursor = conn.cursor(row_factory=class_row(Account))
    await cursor.execute(
        "SELECT account_id, customer_id, currency, status, create_time FROM accounts WHERE account_id = %s", (account_id,)
    )
    return await cursor.fetchone()


async def list_accounts(conn: AsyncConnection, customer_id: UUID, after: tuple[datetime, UUID] | None,
                        limit: int) -> list[Account]:
    """A customer's accounts, newest first, after the keyset (create_time, account_id)."""
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


async def set_status(conn: AsyncConnection, account_id: UUID, status: str) -> None:
    await conn.execute("UPDATE accounts SET status = %s WHERE account_id = %s", (status, account_id))

"""svc_notify's only SQL and CQL: the customer_contacts projection (Postgres, schema notify)
and the notification log (Cassandra, keyspace bank_notify). Returns plain values; retries are
the caller's (service.py), with TRANSIENT_ERRORS."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cassandra import ConsistencyLevel
from cassandra.cluster import Session
from cassandra.query import PreparedStatement
from psycopg_pool import AsyncConnectionPool

from common import cassandra, db
from common.config import Settings
from common.lookups import LookupCoalescer

KEYSPACE = "bank_notify"  # spelled out in every statement below and in cql/: no session-wide USE
# 1 on the local single-node stack; a real cluster wants 3 (then LOCAL_QUORUM is 2 of 3).
CQL_DIR = Path(__file__).parent / "cql"
CONTACT_IDS_MAX = 1000  # customer ids in one contacts query
# Notification ids in one read of the log: a partition read each, all on the coordinator, so a
# request stays well inside the read timeout (a consumer batch of 200 events: 4 requests).
READ_IDS_MAX = 100

TRANSIENT_ERRORS: tuple[type[Exception], ...] = (*cassandra.TRANSIENT_ERRORS, *db.TRANSIENT_ERRORS)


# Storage cannot answer now: transient errors, or not connected yet.
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (*TRANSIENT_ERRORS, cassandra.NotConnected)


@dataclass(frozen=True)
class Notification:
    notification_id: uuid.UUID
    event_id: str
    customer_id: uuid.UUID
    kind: str  # a bank.notify.v1.Notification.Kind name
    channel: str  # a Channel name
    recipient: str
    subject: str
    status: str  # a Status name
    attempts: int  # delivery attempts made so far
    create_time: datetime  # UTC, millisecond precision (Cassandra's timestamp)


def _utc(value: datetime) -> datetime:
    # The driver returns naive datetimes that are UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _notification(row: dict[str, Any]) -> Notification:
    return Notification(
        notification_id=row["notification_id"], event_id=row["event_id"], customer_id=row["customer_id"],
        kind=row["kind"], channel=row["channel"], recipient=row["recipient"], subject=row["subject"],
        status=row["status"], attempts=row["attempts"] or 0, create_time=_utc(row["create_time"]),
    )


@dataclass(frozen=True)
class _Statements:
    get: PreparedStatement
    put: PreparedStatement
    log_put: PreparedStatement
    log_first_page: PreparedStatement
    log_page_after: PreparedStatement


class Store:
    """Started as a worker of the service (connects Cassandra and applies the CQL files)."""

    def __init__(self, settings: Settings, pool: AsyncConnectionPool) -> None:
        self._pool = pool
        self._keyspace = cassandra.Keyspace(settings, pool, KEYSPACE, CQL_DIR, self._prepare, "the notification log")
        self._writes = cassandra.WriteCoalescer(lambda: self._cql()[0])
        self._contacts = LookupCoalescer(self._contacts_query, CONTACT_IDS_MAX)
        self._records = LookupCoalescer(self._notifications_query, READ_IDS_MAX)

    async def start(self) -> None:
        await self._keyspace.start()

    async def stop(self) -> None:
        await self._keyspace.stop()

    @staticmethod
    async def _prepare(session: Session) -> _Statements:
        quorum = ConsistencyLevel.LOCAL_QUORUM
        return _Statements(
            # Plain reads and writes at LOCAL_QUORUM: a record written by one handler is seen by the
            # next one, whichever process it runs in (docs/decisions/0014).
            get=await cassandra.prepare(
                session,
                "SELECT notification_id, event_id, customer_id, kind, channel, recipient, subject, status, attempts,"
                " create_time FROM bank_notify.notifications WHERE notification_id IN ?",
                consistency_level=quorum),
            put=await cassandra.prepare(
                session,
                "INSERT INTO bank_notify.notifications (notification_id, event_id, customer_id, kind, channel, recipient, subject,"
                " status, attempts, create_time, update_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                consistency_level=quorum),
            log_put=await cassandra.prepare(
                session,
                "INSERT INTO bank_notify.notifications_by_customer (notification_id, event_id, customer_id, kind, channel, recipient,"
                " subject, status, attempts, create_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                consistency_level=quorum),
            log_first_page=await cassandra.prepare(
                session,
                "SELECT notification_id, event_id, customer_id, kind, channel, recipient, subject, status, attempts,"
                " create_time FROM bank_notify.notifications_by_customer WHERE customer_id = ? LIMIT ?",
                consistency_level=quorum),
            log_page_after=await cassandra.prepare(
                session,
                "SELECT notification_id, event_id, customer_id, kind, channel, recipient, subject, status, attempts,"
                " create_time FROM bank_notify.notifications_by_customer WHERE customer_id = ?"
                " AND (create_time, notification_id) < (?, ?) LIMIT ?",
                consistency_level=quorum),
        )

    def _cql(self) -> tuple[Session, _Statements]:
        return self._keyspace.session()

    # --- Postgres: customer_contacts ------------------------------------------------------

    async def upsert_registered_contact(self, customer_id: uuid.UUID, email: str, full_name: str,
                                        event_time: datetime) -> bool:
        """Record a registration; False when the row already reflects this or a later event."""
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                "INSERT INTO customer_contacts (customer_id, email, full_name, event_time, update_time)"
                " VALUES (%s, %s, %s, %s, now())"
                " ON CONFLICT (customer_id) DO UPDATE SET email = EXCLUDED.email, full_name = EXCLUDED.full_name,"
                "  event_time = EXCLUDED.event_time, update_time = now()"
                " WHERE customer_contacts.event_time < EXCLUDED.event_time",
                (customer_id, email, full_name, event_time),
            )
            return cursor.rowcount == 1

    async def mark_contact_verified(self, customer_id: uuid.UUID, email: str, event_time: datetime) -> bool:
        """Record a verified address; False when the row already reflects this or a later event.
        A verification without a known registration still creates the row (name unknown)."""
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                "INSERT INTO customer_contacts"
                " (customer_id, email, full_name, email_verified, verify_time, event_time, update_time)"
                " VALUES (%s, %s, '', true, %s, %s, now())"
                " ON CONFLICT (customer_id) DO UPDATE SET email = EXCLUDED.email, email_verified = true,"
                "  verify_time = EXCLUDED.verify_time, event_time = EXCLUDED.event_time, update_time = now()"
                " WHERE customer_contacts.event_time < EXCLUDED.event_time",
                (customer_id, email, event_time, event_time),
            )
            return cursor.rowcount == 1

    async def get_contacts(self, customer_ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
        """The email address of each customer the projection knows, by customer id. The lookups
        asked for in one turn of the event loop (the events of a consumer batch, side by side)
        are one query: one pool connection and round trip instead of one per event."""
        return await self._contacts.get(customer_ids)

    async def _contacts_query(self, customer_ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT customer_id, email FROM customer_contacts WHERE customer_id = ANY(%s)", (sorted(customer_ids),))
            return {row[0]: row[1] for row in await cursor.fetchall()}

    # --- Cassandra: the notification log --------------------------------------------------

    async def get_notifications(self, notification_ids: list[uuid.UUID]) -> dict[uuid.UUID, Notification]:
        """The records written of these notifications, by id. The reads asked for in one turn of
        the event loop (the events of a consumer batch) are one request per READ_IDS_MAX ids."""
        self._cql()  # not connected: NotConnected at once, nothing queued
        return await self._records.get(notification_ids)

    async def _notifications_query(self, notification_ids: list[uuid.UUID]) -> dict[uuid.UUID, Notification]:
        session, statements = self._cql()
        result = await cassandra.execute(session, statements.get, (notification_ids,))
        return {row["notification_id"]: _notification(row) for row in result.current_rows}

    async def put_notification(self, notification: Notification, update_time: datetime) -> None:
        """Write (or overwrite) the notification's record and its row in the customer's list;
        idempotent. Written together with those of the notifications finishing at the same moment
        (cassandra.WriteCoalescer): not atomically, either may be written without the other."""
        _, statements = self._cql()
        n = notification
        await self._writes.write([
            (statements.put, (n.notification_id, n.event_id, n.customer_id, n.kind, n.channel, n.recipient,
                              n.subject, n.status, n.attempts, n.create_time, update_time)),
            (statements.log_put, (n.notification_id, n.event_id, n.customer_id, n.kind, n.channel, n.recipient,
                                  n.subject, n.status, n.attempts, n.create_time))])

    async def put_in_customer_log(self, notification: Notification) -> None:
        """Write (or overwrite) the notification in its customer's list; idempotent (coalesced too)."""
        _, statements = self._cql()
        n = notification
        await self._writes.write([(statements.log_put, (
            n.notification_id, n.event_id, n.customer_id, n.kind, n.channel, n.recipient, n.subject,
            n.status, n.attempts, n.create_time))])

    async def list_customer_notifications(self, customer_id: uuid.UUID, limit: int,
                                          after: tuple[datetime, uuid.UUID] | None) -> list[Notification]:
        """Up to limit notifications of the customer, newest first, strictly after the key `after`
        (a create_time and notification_id) in that order."""
        session, statements = self._cql()
        if after is None:
            result = await cassandra.execute(session, statements.log_first_page, (customer_id, limit))
        else:
            result = await cassandra.execute(session, statements.log_page_after, (customer_id, after[0], after[1], limit))
        return [_notification(row) for row in result.current_rows]

"""svc_customer's SQL: the only place that knows its tables. The use cases take a CustomerStore
(or the fake of tests/unit) and work in a Tx: one pooled connection, in one transaction when
they ask for one. Its methods return plain values; a unique violation becomes Conflict."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from psycopg import AsyncConnection, errors
from psycopg.rows import class_row
from psycopg_pool import AsyncConnectionPool

from common import events


class Conflict(Exception):
    """A uniqueness rule refused the write; `what` names it (email, username, customer)."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


@dataclass(frozen=True)
class Customer:
    customer_id: UUID
    email: str
    full_name: str
    email_verified: bool
    create_time: datetime
    phone_number: str | None


@dataclass(frozen=True)
class VerificationCode:
    customer_id: UUID
    code_hash: bytes
    expire_time: datetime
    failed_attempts: int
    used_time: datetime | None


@dataclass(frozen=True)
class Credential:
    credential_id: UUID
    username: str
    customer_id: UUID | None
    role: str
    password_hash: str


@dataclass(frozen=True)
class RefreshTokenState:
    session_id: UUID
    rotated_time: datetime | None
    revoked_time: datetime | None
    refresh_expire_time: datetime
    subject: str
    role: str


@dataclass(frozen=True)
class Session:
    session_id: UUID
    subject: str
    role: str
    revoked_time: datetime | None


@dataclass(frozen=True)
class ActiveSession:
    session_id: UUID
    create_time: datetime
    last_refresh_time: datetime | None
    refresh_expire_time: datetime


@dataclass(frozen=True)
class PendingCode:
    """A password reset (keyed by email) or an email change (keyed by customer) in progress."""

    customer_id: UUID | None  # None: a reset asked for an address no customer with a login has
    code_hash: bytes
    expire_time: datetime
    failed_attempts: int
    new_email: str = ""  # an email change's target


class CustomerStore:
    """The tables of schema customer, over the pool: a use case's unit of work."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """One transaction: committed when the block ends, rolled back when it raises."""
        async with self._pool.connection() as conn, conn.transaction():
            yield Tx(conn)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Tx]:
        """A connection for reads (or one write) that need no transaction of their own."""
        async with self._pool.connection() as conn:
            yield Tx(conn)


class Tx:
    """What a use case does to the tables, on one connection (in its transaction, if any)."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def append_event(self, event: events.OutboxEvent) -> None:
        """The event goes to the outbox with the rest of the transaction (common/events.py)."""
        await events.append(self._conn, event)

    async def insert_customer(self, customer_id: UUID, email: str, full_name: str,
                              phone_number: str | None) -> Customer:
        try:
            cursor = self._conn.cursor(row_factory=class_row(Customer))
            await cursor.execute(
                "INSERT INTO customers (customer_id, email, full_name, phone_number) VALUES (%s, %s, %s, %s)"
                " RETURNING customer_id, email, full_name, email_verified, create_time, phone_number",
                (customer_id, email, full_name, phone_number),
            )
        except errors.UniqueViolation as exc:
            raise Conflict("email") from exc
        row = await cursor.fetchone()
        assert row is not None
        return row


    async def get_customer(self, customer_id: UUID) -> Customer | None:
        cursor = self._conn.cursor(row_factory=class_row(Customer))
        await cursor.execute(
            "SELECT customer_id, email, full_name, email_verified, create_time, phone_number FROM customers WHERE customer_id = %s",
            (customer_id,),
        )
        return await cursor.fetchone()


    async def set_verification_code(self, customer_id: UUID, code_hash: bytes, expire_time: datetime) -> None:
        await self._conn.execute(
            "INSERT INTO verification_codes (customer_id, code_hash, expire_time) VALUES (%s, %s, %s)"
            " ON CONFLICT (customer_id) DO UPDATE SET code_hash = excluded.code_hash,"
            " expire_time = excluded.expire_time, failed_attempts = 0, used_time = NULL",
            (customer_id, code_hash, expire_time),
        )


    async def lock_verification_code(self, customer_id: UUID) -> VerificationCode | None:
        """The customer's code, locked until commit so concurrent tries are counted one by one."""
        cursor = self._conn.cursor(row_factory=class_row(VerificationCode))
        await cursor.execute(
            "SELECT customer_id, code_hash, expire_time, failed_attempts, used_time"
            " FROM verification_codes WHERE customer_id = %s FOR UPDATE",
            (customer_id,),
        )
        return await cursor.fetchone()


    async def count_failed_attempt(self, customer_id: UUID) -> None:
        await self._conn.execute(
            "UPDATE verification_codes SET failed_attempts = failed_attempts + 1 WHERE customer_id = %s", (customer_id,)
        )


    async def mark_email_verified(self, customer_id: UUID) -> Customer:
        await self._conn.execute("UPDATE verification_codes SET used_time = now() WHERE customer_id = %s", (customer_id,))
        cursor = self._conn.cursor(row_factory=class_row(Customer))
        await cursor.execute(
            "UPDATE customers SET email_verified = true WHERE customer_id = %s"
            " RETURNING customer_id, email, full_name, email_verified, create_time, phone_number",
            (customer_id,),
        )
        row = await cursor.fetchone()
        assert row is not None
        return row


    async def insert_enrollment_token(self, token_hash: bytes, customer_id: UUID, expire_time: datetime) -> None:
        await self._conn.execute(
            "INSERT INTO enrollment_tokens (token_hash, customer_id, expire_time) VALUES (%s, %s, %s)",
            (token_hash, customer_id, expire_time),
        )


    async def enrollment_token_is_live(self, token_hash: bytes) -> bool:
        """Whether the token could be spent now: a cheap look before costly work (spending it,
        use_enrollment_token, still decides)."""
        cursor = await self._conn.execute(
            "SELECT 1 FROM enrollment_tokens WHERE token_hash = %s AND used_time IS NULL AND expire_time > now()",
            (token_hash,),
        )
        return await cursor.fetchone() is not None


    async def use_enrollment_token(self, token_hash: bytes) -> UUID | None:
        """Spend a live enrollment token (one statement, so two racing uses cannot both win)."""
        cursor = await self._conn.execute(
            "UPDATE enrollment_tokens SET used_time = now()"
            " WHERE token_hash = %s AND used_time IS NULL AND expire_time > now() RETURNING customer_id",
            (token_hash,),
        )
        row = await cursor.fetchone()
        return row[0] if row else None


    async def insert_credential(self, credential_id: UUID, username: str, customer_id: UUID | None,
                                role: str, password_hash: str) -> None:
        try:
            await self._conn.execute(
                "INSERT INTO credentials (credential_id, username, customer_id, role, password_hash)"
                " VALUES (%s, %s, %s, %s, %s)",
                (credential_id, username, customer_id, role, password_hash),
            )
        except errors.UniqueViolation as exc:
            constraint = exc.diag.constraint_name or ""
            raise Conflict("customer" if "customer_id" in constraint else "username") from exc


    async def upsert_teller(self, credential_id: UUID, username: str, password_hash: str) -> None:
        await self._conn.execute(
            "INSERT INTO credentials (credential_id, username, customer_id, role, password_hash)"
            " VALUES (%s, %s, NULL, 'teller', %s)"
            " ON CONFLICT (username) DO UPDATE SET password_hash = excluded.password_hash WHERE credentials.role = 'teller'",
            (credential_id, username, password_hash),
        )


    async def get_credential(self, username: str) -> Credential | None:
        cursor = self._conn.cursor(row_factory=class_row(Credential))
        await cursor.execute(
            "SELECT credential_id, username, customer_id, role, password_hash FROM credentials WHERE username = %s",
            (username,),
        )
        return await cursor.fetchone()


    async def update_password_hash(self, credential_id: UUID, password_hash: str) -> None:
        await self._conn.execute("UPDATE credentials SET password_hash = %s WHERE credential_id = %s", (password_hash, credential_id))


    async def insert_session(self, session_id: UUID, credential_id: UUID, subject: str, role: str,
                             refresh_hash: bytes, refresh_expire_time: datetime) -> None:
        await self._conn.execute(
            "INSERT INTO sessions (session_id, credential_id, subject, role, refresh_expire_time) VALUES (%s, %s, %s, %s, %s)",
            (session_id, credential_id, subject, role, refresh_expire_time),
        )
        await self._conn.execute("INSERT INTO refresh_tokens (token_hash, session_id) VALUES (%s, %s)", (refresh_hash, session_id))


    async def lock_refresh_token(self, token_hash: bytes) -> RefreshTokenState | None:
        cursor = self._conn.cursor(row_factory=class_row(RefreshTokenState))
        await cursor.execute(
            "SELECT r.session_id, r.rotated_time, s.revoked_time, s.refresh_expire_time, s.subject, s.role"
            " FROM refresh_tokens r JOIN sessions s USING (session_id)"
            " WHERE r.token_hash = %s FOR UPDATE OF r, s",
            (token_hash,),
        )
        return await cursor.fetchone()


    async def rotate_refresh_token(self, old_hash: bytes, new_hash: bytes, session_id: UUID) -> None:
        await self._conn.execute("UPDATE refresh_tokens SET rotated_time = now() WHERE token_hash = %s", (old_hash,))
        await self._conn.execute("INSERT INTO refresh_tokens (token_hash, session_id) VALUES (%s, %s)", (new_hash, session_id))


    async def get_session(self, session_id: UUID) -> Session | None:
        cursor = self._conn.cursor(row_factory=class_row(Session))
        await cursor.execute(
            "SELECT session_id, subject, role, revoked_time FROM sessions WHERE session_id = %s", (session_id,)
        )
        return await cursor.fetchone()


    async def revoke_session(self, session_id: UUID, reason: str) -> None:
        await self._conn.execute(
            "UPDATE sessions SET revoked_time = now(), revoke_reason = %s WHERE session_id = %s AND revoked_time IS NULL",
            (reason, session_id),
        )


    async def list_active_sessions(self, customer_id: UUID, after: tuple[datetime, UUID] | None,
                                   limit: int) -> list[ActiveSession]:
        """The customer's sessions neither revoked nor expired, newest first, strictly after the key.
        The first refresh token is written in the session's own transaction (same now()), so a later
        one means a refresh."""
        cursor = self._conn.cursor(row_factory=class_row(ActiveSession))
        await cursor.execute(
            "SELECT s.session_id, s.create_time, s.refresh_expire_time,"
            " (SELECT NULLIF(max(r.create_time), s.create_time) FROM refresh_tokens r"
            "  WHERE r.session_id = s.session_id) AS last_refresh_time"
            " FROM sessions s JOIN credentials c USING (credential_id)"
            " WHERE c.customer_id = %(customer_id)s AND s.revoked_time IS NULL AND s.refresh_expire_time > now()"
            " AND (%(after_time)s::timestamptz IS NULL OR (s.create_time, s.session_id) < (%(after_time)s, %(after_id)s))"
            " ORDER BY s.create_time DESC, s.session_id DESC LIMIT %(limit)s",
            {"customer_id": customer_id, "after_time": after[0] if after else None,
             "after_id": after[1] if after else None, "limit": limit},
        )
        return await cursor.fetchall()

    # --- recovery and profile ---------------------------------------------------------------

    async def lock_registration(self, email: str) -> Customer | None:
        """The customer holding this email, if any, after taking the email's lock: registrations
        (and confirmed email changes) of one address run one after the other until commit."""
        await self._conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('customer-email:' || %s, 0))", (email,))
        cursor = self._conn.cursor(row_factory=class_row(Customer))
        await cursor.execute(
            "SELECT customer_id, email, full_name, email_verified, create_time, phone_number FROM customers"
            " WHERE email = %s FOR UPDATE", (email,))
        return await cursor.fetchone()


    async def delete_unverified_customer(self, customer_id: UUID) -> bool:
        """Discards a registration that was never verified (its code goes with it)."""
        cursor = await self._conn.execute(
            "DELETE FROM customers WHERE customer_id = %s AND NOT email_verified", (customer_id,))
        return cursor.rowcount == 1


    async def delete_stale_registrations(self, older_than: datetime, limit: int) -> int:
        """Removes up to limit unverified registrations made before older_than; how many went."""
        cursor = await self._conn.execute(
            "DELETE FROM customers WHERE customer_id IN (SELECT customer_id FROM customers"
            " WHERE NOT email_verified AND create_time < %s ORDER BY create_time LIMIT %s"
            " FOR UPDATE SKIP LOCKED)",
            (older_than, limit),
        )
        return cursor.rowcount


    async def delete_stale_password_resets(self, older_than: datetime, limit: int) -> int:
        cursor = await self._conn.execute(
            "DELETE FROM password_resets WHERE email IN (SELECT email FROM password_resets"
            " WHERE create_time < %s ORDER BY create_time LIMIT %s FOR UPDATE SKIP LOCKED)",
            (older_than, limit),
        )
        return cursor.rowcount


    async def get_customer_by_email(self, email: str) -> Customer | None:
        cursor = self._conn.cursor(row_factory=class_row(Customer))
        await cursor.execute(
            "SELECT customer_id, email, full_name, email_verified, create_time, phone_number FROM customers WHERE email = %s", (email,))
        return await cursor.fetchone()


    async def get_customer_credential(self, customer_id: UUID) -> Credential | None:
        cursor = self._conn.cursor(row_factory=class_row(Credential))
        await cursor.execute(
            "SELECT credential_id, username, customer_id, role, password_hash FROM credentials WHERE customer_id = %s",
            (customer_id,),
        )
        return await cursor.fetchone()


    async def reset_target(self, email: str) -> tuple[UUID, str] | None:
        """The verified customer with credentials who has this email: (customer id, username)."""
        cursor = await self._conn.execute(
            "SELECT c.customer_id, k.username FROM customers c JOIN credentials k USING (customer_id)"
            " WHERE c.email = %s AND c.email_verified",
            (email,),
        )
        row = await cursor.fetchone()
        return (row[0], row[1]) if row else None


    async def set_password_reset(self, email: str, customer_id: UUID | None, code_hash: bytes,
                                 expire_time: datetime) -> None:
        """A new code for the address; the older one (and its wrong tries) is void."""
        await self._conn.execute(
            "INSERT INTO password_resets (email, customer_id, code_hash, expire_time) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (email) DO UPDATE SET customer_id = excluded.customer_id, code_hash = excluded.code_hash,"
            " expire_time = excluded.expire_time, failed_attempts = 0, used_time = NULL, create_time = now()",
            (email, customer_id, code_hash, expire_time),
        )


    async def lock_password_reset(self, email: str) -> PendingCode | None:
        """The address's live (unused) reset, locked until commit so concurrent tries count one by one."""
        cursor = self._conn.cursor(row_factory=class_row(PendingCode))
        await cursor.execute(
            "SELECT customer_id, code_hash, expire_time, failed_attempts FROM password_resets"
            " WHERE email = %s AND used_time IS NULL FOR UPDATE",
            (email,),
        )
        return await cursor.fetchone()


    async def count_failed_reset(self, email: str) -> None:
        await self._conn.execute("UPDATE password_resets SET failed_attempts = failed_attempts + 1 WHERE email = %s", (email,))


    async def use_password_reset(self, email: str) -> None:
        await self._conn.execute("UPDATE password_resets SET used_time = now() WHERE email = %s", (email,))


    async def set_password(self, customer_id: UUID, password_hash: str) -> None:
        await self._conn.execute("UPDATE credentials SET password_hash = %s WHERE customer_id = %s", (password_hash, customer_id))


    async def revoke_customer_sessions(self, customer_id: UUID, reason: str,
                                       keep: UUID | None = None) -> list[UUID]:
        """Revokes every live session of the customer but keep; the ids of those revoked."""
        cursor = await self._conn.execute(
            "UPDATE sessions s SET revoked_time = now(), revoke_reason = %s FROM credentials c"
            " WHERE c.credential_id = s.credential_id AND c.customer_id = %s AND s.revoked_time IS NULL"
            " AND s.refresh_expire_time > now() AND s.session_id IS DISTINCT FROM %s RETURNING s.session_id",
            (reason, customer_id, keep),
        )
        return [row[0] for row in await cursor.fetchall()]


    async def update_profile(self, customer_id: UUID, changes: dict[str, str | None]) -> Customer | None:
        """Sets the columns named in changes (full_name, phone_number) of the customer's row."""
        assert changes and set(changes) <= {"full_name", "phone_number"}, changes
        cursor = self._conn.cursor(row_factory=class_row(Customer))
        await cursor.execute(
            "UPDATE customers SET"
            " full_name = CASE WHEN %(set_full_name)s THEN %(full_name)s ELSE full_name END,"
            " phone_number = CASE WHEN %(set_phone_number)s THEN %(phone_number)s ELSE phone_number END"
            " WHERE customer_id = %(customer_id)s RETURNING customer_id, email, full_name, email_verified, create_time, phone_number",
            {"set_full_name": "full_name" in changes, "full_name": changes.get("full_name"),
             "set_phone_number": "phone_number" in changes, "phone_number": changes.get("phone_number"),
             "customer_id": customer_id},
        )
        return await cursor.fetchone()


    async def set_email_change(self, customer_id: UUID, new_email: str, code_hash: bytes,
                               expire_time: datetime) -> None:
        await self._conn.execute(
            "INSERT INTO email_changes (customer_id, new_email, code_hash, expire_time) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (customer_id) DO UPDATE SET new_email = excluded.new_email, code_hash = excluded.code_hash,"
            " expire_time = excluded.expire_time, failed_attempts = 0, create_time = now()",
            (customer_id, new_email, code_hash, expire_time),
        )


    async def lock_email_change(self, customer_id: UUID) -> PendingCode | None:
        cursor = self._conn.cursor(row_factory=class_row(PendingCode))
        await cursor.execute(
            "SELECT customer_id, code_hash, expire_time, failed_attempts, new_email FROM email_changes"
            " WHERE customer_id = %s FOR UPDATE",
            (customer_id,),
        )
        return await cursor.fetchone()


    async def count_failed_email_change(self, customer_id: UUID) -> None:
        await self._conn.execute("UPDATE email_changes SET failed_attempts = failed_attempts + 1 WHERE customer_id = %s",
                           (customer_id,))


    async def apply_email_change(self, customer_id: UUID, new_email: str) -> Customer:
        """The new (proven) address becomes the customer's email; the pending change is done."""
        await self._conn.execute("DELETE FROM email_changes WHERE customer_id = %s", (customer_id,))
        cursor = self._conn.cursor(row_factory=class_row(Customer))
        await cursor.execute(
            "UPDATE customers SET email = %s WHERE customer_id = %s"
            " RETURNING customer_id, email, full_name, email_verified, create_time, phone_number",
            (new_email, customer_id),
        )
        row = await cursor.fetchone()
        assert row is not None
        return row


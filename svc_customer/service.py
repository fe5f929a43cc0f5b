"""svc_customer's use cases: registration, email verification, credentials and sessions.

Each function reads like the rules of ../shared/API.md. Costs: registration and verification
are one Postgres transaction each (the event goes to the outbox in it); login is one read, one
argon2id verification (~tens of ms of CPU, run off the event loop) and one transaction;
refresh is one transaction; logout is one transaction and one Redis write. Login and
verification also ask Redis about failed attempts (one script call before, one more after a
failure or a login): see Throttle.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import grpc
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from bank.events.v1 import events_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from psycopg_pool import AsyncConnectionPool

from common import auth, events, pagination, ratelimit
from common.config import Settings
from common.errors import DomainError
from common.ids import new_id, parse_uuid, uuid7
from svc_customer import store

log = logging.getLogger("customer")

CODE_TTL = timedelta(minutes=15)
ENROLLMENT_TTL = timedelta(minutes=15)
MAX_CODE_ATTEMPTS = 5
CODE_DIGITS = 6
EMAIL_MAX_LENGTH = 254
FULL_NAME_MAX_LENGTH = 100
PASSWORD_MIN_LENGTH = 10
PASSWORD_MAX_LENGTH = 128  # argon2 takes any length; a bound keeps a request from buying CPU
# Password verifications at once per process: argon2id is CPU-bound (more than the cores only
# queue) and 19 MiB each; the bound also caps how many guesses pass a throttle check together.
LOGINS_IN_FLIGHT_MAX = 8
# Code checks at once per process: the per-address limit is checked before a wrong code is
# counted, so at most this many guesses sent in parallel can pass one check together.
VERIFICATIONS_IN_FLIGHT_MAX = 8
USERNAME = re.compile(r"^[a-z0-9][a-z0-9._-]{2,31}$")
EMAIL = re.compile(r"^[a-z0-9!#$%&'*+/=?^_`{|}~.-]+@[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+$")
E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
COMMON_PASSWORDS_FILE = Path(__file__).with_name("common_passwords.txt")

# OWASP's argon2id parameters: 19 MiB, 2 iterations, 1 degree of parallelism.
HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1, hash_len=32, salt_len=16)
# Verified against when the username is unknown, so both failures cost the same time.
_DUMMY_HASH = HASHER.hash(secrets.token_urlsafe(16))


def _invalid(field: str, description: str, reason: str = "INVALID_ARGUMENT") -> DomainError:
    return DomainError(grpc.StatusCode.INVALID_ARGUMENT, reason, f"{field}: {description}",
                       field_violations=[(field, description)])


def _load_common_passwords(path: Path) -> frozenset[str]:
    return frozenset(line.strip().lower() for line in path.read_text().splitlines()
                     if line.strip() and not line.startswith("#"))


def _timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def _sha256(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


@dataclass(frozen=True)
class Throttle:
    """Failed attempts, counted in Redis per username and per client address (docs/decisions/0010).
    Only failures count, so a customer's own logins never run into a limit."""

    limiter: ratelimit.SlidingWindow
    login_by_username: ratelimit.Limit
    login_by_address: ratelimit.Limit
    verify_by_address: ratelimit.Limit
    exempt: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def from_settings(cls, limiter: ratelimit.SlidingWindow, s: Settings) -> Throttle:
        return cls(
            limiter,
            login_by_username=ratelimit.Limit("login_failures_by_username", s.login_failures_per_username_max,
                                              s.login_failures_per_username_window_s),
            login_by_address=ratelimit.Limit("login_failures_by_address", s.login_failures_per_address_max,
                                             s.login_failures_per_address_window_s),
            verify_by_address=ratelimit.Limit("verify_failures_by_address", s.verify_failures_per_address_max,
                                              s.verify_failures_per_address_window_s),
            exempt=ratelimit.parse_networks(s.rate_limit_exempt_addresses),
        )

    def by_address(self, limit: ratelimit.Limit, client_address: str) -> list[ratelimit.Count]:
        if ratelimit.is_exempt(client_address, self.exempt):
            return []
        return [ratelimit.Count(limit, ratelimit.address_subject(client_address))]

    async def check(self, counts: list[ratelimit.Count]) -> None:
        retry_after_s = await self.limiter.retry_after_s(counts)
        if retry_after_s > 0:
            raise ratelimit.rate_limited(retry_after_s)


@dataclass(frozen=True)
class IssuedSession:
    session_id: str
    customer_id: str
    access_token: auth.AccessToken
    refresh_token: str
    refresh_expire_time: datetime


class CustomerUseCases:
    def __init__(self, pool: AsyncConnectionPool, keys: auth.KeyRing, revocations: auth.Revocations, throttle: Throttle,
                 access_ttl_s: int, refresh_ttl_s: int, common_passwords_file: Path = COMMON_PASSWORDS_FILE) -> None:
        self._pool = pool
        self._throttle = throttle
        self._login_slots = asyncio.Semaphore(LOGINS_IN_FLIGHT_MAX)
        self._verify_slots = asyncio.Semaphore(VERIFICATIONS_IN_FLIGHT_MAX)
        self._issuer = auth.TokenIssuer(keys, access_ttl_s)
        self._revocations = revocations
        self._refresh_ttl = timedelta(seconds=refresh_ttl_s)
        # Verification codes are short: stored as an HMAC under a server-side key, so a copy of
        # the table alone does not give them away.
        self._code_key = hmac.new(keys.service_token.encode(), b"verification-code", hashlib.sha256).digest()
        self._common_passwords = _load_common_passwords(common_passwords_file)

    def _code_hash(self, customer_id: UUID, code: str) -> bytes:
        return hmac.new(self._code_key, f"{customer_id}:{code}".encode(), hashlib.sha256).digest()

    # --- registration and verification ----------------------------------------------------

    async def register_customer(self, email: str, full_name: str, phone_number: str) -> store.Customer:
        email = email.strip().lower()
        if len(email) > EMAIL_MAX_LENGTH or not EMAIL.match(email):
            raise _invalid("email", "must be a valid email address")
        full_name = " ".join(full_name.split())
        if not 1 <= len(full_name) <= FULL_NAME_MAX_LENGTH:
            raise _invalid("full_name", f"must be 1 to {FULL_NAME_MAX_LENGTH} characters")
        phone = phone_number.strip() or None
        if phone is not None and not E164.match(phone):
            raise _invalid("phone_number", "must be in E.164 form, e.g. +14155550123")

        customer_id = uuid7()
        code = f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}"
        now = datetime.now(UTC)
        async with self._pool.connection() as conn, conn.transaction():
            try:
                customer = await store.insert_customer(conn, customer_id, email, full_name, phone)
            except store.Conflict as exc:
                raise DomainError(grpc.StatusCode.ALREADY_EXISTS, "EMAIL_TAKEN",
                                  "a customer with this email already exists") from exc
            await store.set_verification_code(conn, customer_id, self._code_hash(customer_id, code), now + CODE_TTL)
            event = events_pb2.CustomerRegistered(
                event_id=new_id(), customer_id=str(customer_id), email=email, full_name=full_name,
                verification_code=code, create_time=_timestamp(customer.create_time),
            )
            await events.append(conn, events.OutboxEvent(events.CUSTOMER_TOPIC, str(customer_id), event))
        return customer

    async def verify_email(self, customer_id: str, code: str, client_address: str) -> tuple[store.Customer, str]:
        cid = parse_uuid(customer_id)
        if cid is None:
            raise DomainError(grpc.StatusCode.NOT_FOUND, "CUSTOMER_NOT_FOUND", "no such customer")
        if not code.isdigit() or len(code) != CODE_DIGITS:
            raise _invalid("code", f"must be the {CODE_DIGITS}-digit code from the email", "INVALID_CODE")
        # Wrong codes per customer are capped in Postgres (TOO_MANY_ATTEMPTS, for good); per client
        # address, here: someone guessing across many registrations.
        by_address = self._throttle.by_address(self._throttle.verify_by_address, client_address)
        async with self._verify_slots:
            return await self._check_code(cid, code, by_address)

    async def _check_code(self, cid: UUID, code: str, by_address: list[ratelimit.Count]) -> tuple[store.Customer, str]:
        """verify_email's check, from the limit to the counted failure, in one verification slot."""
        await self._throttle.check(by_address)
        failure: DomainError | None = None
        enrollment_token = secrets.token_urlsafe(32)
        async with self._pool.connection() as conn, conn.transaction():
            row = await store.lock_verification_code(conn, cid)
            if row is None:
                raise DomainError(grpc.StatusCode.NOT_FOUND, "CUSTOMER_NOT_FOUND", "no such customer")
            if row.used_time is not None:
                raise DomainError(grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_VERIFIED", "the email is already verified")
            if row.failed_attempts >= MAX_CODE_ATTEMPTS:
                raise DomainError(grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_ATTEMPTS",
                                  "too many wrong codes; this registration can no longer be verified")
            if row.expire_time <= datetime.now(UTC):
                raise DomainError(grpc.StatusCode.FAILED_PRECONDITION, "CODE_EXPIRED", "the code has expired")
            if not hmac.compare_digest(row.code_hash, self._code_hash(cid, code)):
                # Counted in this transaction, which commits: the error is raised after it.
                await store.count_failed_attempt(conn, cid)
                failure = _invalid("code", "is not the code we sent", "INVALID_CODE")
            else:
                customer = await store.mark_email_verified(conn, cid)
                await store.insert_enrollment_token(conn, _sha256(enrollment_token), cid,
                                                    datetime.now(UTC) + ENROLLMENT_TTL)
                event = events_pb2.EmailVerified(event_id=new_id(), customer_id=str(cid), email=customer.email,
                                                 create_time=_timestamp(datetime.now(UTC)))
                await events.append(conn, events.OutboxEvent(events.CUSTOMER_TOPIC, str(cid), event))
        if failure is not None:
            await self._throttle.limiter.record(by_address)
            raise failure
        return customer, enrollment_token

    async def get_customer(self, caller: auth.Caller, customer_id: str) -> store.Customer:
        cid = parse_uuid(customer_id)
        # Another customer's record is never revealed: not found, as if it did not exist.
        if cid is None or not (caller.is_teller or caller.customer_id == str(cid)):
            raise DomainError(grpc.StatusCode.NOT_FOUND, "CUSTOMER_NOT_FOUND", "no such customer")
        async with self._pool.connection() as conn:
            customer = await store.get_customer(conn, cid)
        if customer is None:
            raise DomainError(grpc.StatusCode.NOT_FOUND, "CUSTOMER_NOT_FOUND", "no such customer")
        return customer

    # --- credentials ----------------------------------------------------------------------

    def check_password(self, username: str, password: str) -> None:
        if not PASSWORD_MIN_LENGTH <= len(password) <= PASSWORD_MAX_LENGTH:
            raise _invalid("password", f"must be {PASSWORD_MIN_LENGTH} to {PASSWORD_MAX_LENGTH} characters",
                           "WEAK_PASSWORD")
        lowered = password.lower()
        if lowered in self._common_passwords or len(set(lowered)) <= 2 or username in lowered:
            raise _invalid("password", "is too easy to guess (common, repetitive, or contains the username)",
                           "WEAK_PASSWORD")

    async def create_credential(self, enrollment_token: str, username: str, password: str) -> tuple[str, str]:
        username = username.strip().lower()
        if not USERNAME.match(username):
            raise _invalid("username", "3 to 32 characters: letters, digits, '.', '_' or '-', starting with a letter "
                           "or digit")
        self.check_password(username, password)
        if not enrollment_token or len(enrollment_token) > 256:
            raise DomainError(grpc.StatusCode.UNAUTHENTICATED, "INVALID_ENROLLMENT_TOKEN",
                              "the enrollment token is not valid")
        token_hash = _sha256(enrollment_token)
        async with self._pool.connection() as conn:
            live = await store.enrollment_token_is_live(conn, token_hash)
        if not live:
            raise DomainError(grpc.StatusCode.UNAUTHENTICATED, "INVALID_ENROLLMENT_TOKEN",
                              "the enrollment token is not valid, used, or expired")
        # Only a live token buys a password hash (argon2id: ~20 ms of a core and 19 MiB), and no
        # more hashes run at once than password checks do.
        async with self._login_slots:
            password_hash = await asyncio.to_thread(HASHER.hash, password)
        async with self._pool.connection() as conn, conn.transaction():
            # Still the deciding step: a use racing this one may have spent the token meanwhile.
            customer_id = await store.use_enrollment_token(conn, token_hash)
            if customer_id is None:
                raise DomainError(grpc.StatusCode.UNAUTHENTICATED, "INVALID_ENROLLMENT_TOKEN",
                                  "the enrollment token is not valid, used, or expired")
            try:
                await store.insert_credential(conn, uuid7(), username, customer_id, "customer", password_hash)
            except store.Conflict as exc:
                if exc.what == "username":
                    raise DomainError(grpc.StatusCode.ALREADY_EXISTS, "USERNAME_TAKEN",
                                      "this username is taken") from exc
                raise DomainError(grpc.StatusCode.ALREADY_EXISTS, "CREDENTIAL_EXISTS",
                                  "this customer already has credentials") from exc
        return str(customer_id), username

    async def ensure_teller(self, username: str, password: str) -> None:
        """The local teller login, from BANK_TELLER_USERNAME / BANK_TELLER_PASSWORD."""
        username = username.strip().lower()
        if not username or not password:
            return
        async with self._pool.connection() as conn:
            existing = await store.get_credential(conn, username)
        if existing is not None and existing.role != "teller":
            raise RuntimeError(f"BANK_TELLER_USERNAME={username!r} belongs to a customer")
        if existing is not None and await asyncio.to_thread(_verifies, existing.password_hash, password):
            return
        password_hash = await asyncio.to_thread(HASHER.hash, password)
        async with self._pool.connection() as conn, conn.transaction():
            await store.upsert_teller(conn, uuid7(), username, password_hash)
        log.info("teller login ready", extra={"fields": {"username": username}})

    # --- sessions -------------------------------------------------------------------------

    async def login(self, username: str, password: str, client_address: str) -> IssuedSession:
        username = username.strip().lower()
        bad = DomainError(grpc.StatusCode.UNAUTHENTICATED, "BAD_CREDENTIALS", "wrong username or password")
        # Unknown usernames count too: a limit that only known ones hit would tell which exist.
        by_username = [ratelimit.Count(self._throttle.login_by_username, username)]
        failures = by_username + self._throttle.by_address(self._throttle.login_by_address, client_address)
        async with self._login_slots:
            # Checked once a slot is free: guesses sent in parallel cannot all pass one check
            # before the first failure is counted; at most LOGINS_IN_FLIGHT_MAX can.
            await self._throttle.check(failures)
            credential: store.Credential | None = None
            if len(username) > 64 or len(password) > PASSWORD_MAX_LENGTH:
                ok = await asyncio.to_thread(_verifies, _DUMMY_HASH, password[:PASSWORD_MAX_LENGTH])
            else:
                async with self._pool.connection() as conn:
                    credential = await store.get_credential(conn, username)
                # The same work whether or not the user exists, so timing tells nothing.
                ok = await asyncio.to_thread(_verifies, credential.password_hash if credential else _DUMMY_HASH,
                                             password)
            if credential is None or not ok:
                await self._throttle.limiter.record(failures)
                raise bad
        # The right password ends a run of the username's failures (an address's stay counted).
        await self._throttle.limiter.clear(by_username)
        if HASHER.check_needs_rehash(credential.password_hash):
            new_hash = await asyncio.to_thread(HASHER.hash, password)
            async with self._pool.connection() as conn:
                await store.update_password_hash(conn, credential.credential_id, new_hash)
        role = auth.Role(credential.role)
        subject = str(credential.customer_id) if role is auth.Role.CUSTOMER else str(credential.credential_id)
        session_id = uuid7()
        refresh_token = secrets.token_urlsafe(32)
        refresh_expire = datetime.now(UTC) + self._refresh_ttl
        async with self._pool.connection() as conn, conn.transaction():
            await store.insert_session(conn, session_id, credential.credential_id, subject, role.value,
                                       _sha256(refresh_token), refresh_expire)
        access = self._issuer.issue(subject, role, str(session_id))
        return IssuedSession(str(session_id), subject if role is auth.Role.CUSTOMER else "", access, refresh_token,
                             refresh_expire)

    async def refresh_session(self, refresh_token: str) -> IssuedSession:
        invalid = DomainError(grpc.StatusCode.UNAUTHENTICATED, "INVALID_REFRESH_TOKEN", "the refresh token is not valid")
        if not refresh_token or len(refresh_token) > 256:
            raise invalid
        presented = _sha256(refresh_token)
        new_token = secrets.token_urlsafe(32)
        revoked: UUID | None = None
        async with self._pool.connection() as conn, conn.transaction():
            state = await store.lock_refresh_token(conn, presented)
            if state is None:
                raise invalid
            if state.revoked_time is None and state.rotated_time is not None:
                # A rotated token came back: someone holds a copy. Revoke the whole session.
                await store.revoke_session(conn, state.session_id, "refresh token reuse")
                revoked = state.session_id
            elif state.revoked_time is None and state.refresh_expire_time > datetime.now(UTC):
                await store.rotate_refresh_token(conn, presented, _sha256(new_token), state.session_id)
        if revoked is not None:
            await self._revocations.revoke(str(revoked))
            log.warning("refresh token reused; session revoked", extra={"fields": {"session_id": str(revoked)}})
        if state.revoked_time is not None or revoked is not None:
            raise DomainError(grpc.StatusCode.UNAUTHENTICATED, "SESSION_REVOKED", "the session has been revoked")
        if state.refresh_expire_time <= datetime.now(UTC):
            raise DomainError(grpc.StatusCode.UNAUTHENTICATED, "SESSION_EXPIRED", "the session has expired; log in again")
        role = auth.Role(state.role)
        access = self._issuer.issue(state.subject, role, str(state.session_id))
        return IssuedSession(str(state.session_id), state.subject if role is auth.Role.CUSTOMER else "", access,
                             new_token, state.refresh_expire_time)

    async def logout(self, caller: auth.Caller, session_id: str) -> None:
        sid = parse_uuid(session_id)
        async with self._pool.connection() as conn, conn.transaction():
            session = await store.get_session(conn, sid) if sid else None
            if session is None or session.subject != caller.subject or session.role != caller.role.value:
                raise DomainError(grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND", "no such session")
            assert sid is not None
            await store.revoke_session(conn, sid, "logout")
        # After commit: from here on every token of the session is refused by every service.
        await self._revocations.revoke(str(sid))

    async def list_sessions(self, caller: auth.Caller, customer_id: str, page_size: int,
                            page_token: str) -> tuple[list[store.ActiveSession], str]:
        """The customer's active sessions, newest first; nobody else's (a teller's neither)."""
        size = pagination.page_size(page_size)
        key = pagination.decode_token(page_token, 2)
        cid = parse_uuid(customer_id)
        if cid is None or caller.customer_id != str(cid):
            raise DomainError(grpc.StatusCode.NOT_FOUND, "CUSTOMER_NOT_FOUND", "no such customer")
        after = None
        if key is not None:
            after_id = parse_uuid(key[1]) if isinstance(key[1], str) else None
            try:
                after_time = datetime.fromisoformat(key[0]) if isinstance(key[0], str) else None
            except ValueError:
                after_time = None
            if after_id is None or after_time is None:
                raise pagination.invalid_token()
            after = (after_time, after_id)
        async with self._pool.connection() as conn:
            rows = await store.list_active_sessions(conn, cid, after, size + 1)
        page = rows[:size]
        token = pagination.encode_token([page[-1].create_time.isoformat(), str(page[-1].session_id)]) \
            if len(rows) > size else ""
        return page, token

    async def customer_profile(self, customer_id: str) -> store.Customer:
        cid = parse_uuid(customer_id)
        async with self._pool.connection() as conn:
            customer = await store.get_customer(conn, cid) if cid else None
        if customer is None:
            raise DomainError(grpc.StatusCode.NOT_FOUND, "CUSTOMER_NOT_FOUND", "no such customer")
        return customer


def _verifies(password_hash: str, password: str) -> bool:
    try:
        return HASHER.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False

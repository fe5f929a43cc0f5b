"""svc_customer's use cases: registration, email verification, credentials and sessions, and
account recovery and profile (resend, password reset and change, profile and email changes).

Each function reads like the rules of ../shared/API.md. Costs: registration and verification
are one Postgres transaction each (the event goes to the outbox in it); login is one read, one
argon2id verification (~tens of ms of CPU, run off the event loop) and one transaction;
refresh is one transaction; logout is one transaction and one Redis write. Login and
verification also ask Redis about failed attempts (one script call before, one more after a
failure or a login): see Throttle. A password reset or change costs one argon2id hash and ends
sessions (one Redis write each); the requests naming an email answer after ANSWER_FLOOR_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from bank.events.v1 import events_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from psycopg_pool import AsyncConnectionPool

from common import auth, events, pagination, ratelimit
from common.config import Settings
from common.errors import DomainError, refused
from common.ids import new_id, parse_uuid, uuid7
from common.logging import fields
from svc_customer import store

log = logging.getLogger("customer")

CODE_TTL = timedelta(minutes=15)
ENROLLMENT_TTL = timedelta(minutes=15)
CODE_ATTEMPTS_MAX = 5
CODE_DIGITS = 6
EMAIL_MAX_LENGTH = 254
FULL_NAME_LENGTH_MAX = 100
PASSWORD_LENGTH_MIN = 10
PASSWORD_LENGTH_MAX = 128  # argon2 takes any length; a bound keeps a request from buying CPU
# Password verifications and hashes at once per process: argon2id is CPU-bound (more than the
# cores only queue) and 19 MiB each. Guesses are capped by the throttle's reservations instead.
LOGINS_IN_FLIGHT_MAX = 8
# Code checks at once per process: the per-address limit is checked before a wrong code is
# counted, so at most this many guesses sent in parallel can pass one check together.
VERIFICATIONS_IN_FLIGHT_MAX = 8
# Codes asked for by email (ResendVerificationCode, RequestPasswordReset; ChangeEmail per
# customer): API.md's limits.
CODE_REQUESTS_PER_EMAIL_MAX = 3
CODE_REQUESTS_PER_EMAIL_WINDOW_S = 3600
CODE_REQUESTS_PER_ADDRESS_MAX = 20
CODE_REQUESTS_PER_ADDRESS_WINDOW_S = 900
# Failed logins of one username from anywhere (docs/decisions/0016): slower than the limit per
# username and address, so that many addresses together cannot guess fast either; a password
# reset lifts it.
USERNAME_FAILURES_MAX = 100
USERNAME_FAILURES_WINDOW_S = 3600
# Unverified registrations are removed after this long (API.md), by a sweep every SWEEP_EVERY_S,
# in batches of SWEEP_BATCH_MAX rows; password reset rows go a day after their last request.
UNVERIFIED_TTL = timedelta(days=7)
PASSWORD_RESET_ROW_TTL = timedelta(days=1)
SWEEP_EVERY_S = 3600.0
SWEEP_BATCH_MAX = 1000
# The requests without a token that name an email (resend, password reset) answer no sooner
# than this after they arrive, so known and unknown addresses take the same time: above their
# usual duration (p90 ~25 ms on the 2-core machine under load; perf/bench_recovery.py).
ANSWER_FLOOR_S = 0.05
# Session revocations sent to Redis side by side when a password reset or change ends sessions.
REVOCATIONS_AT_ONCE_MAX = 4
# What UpdateCustomer may change (AIP-134 update_mask paths); the rest is immutable.
MUTABLE_FIELDS = frozenset({"full_name", "phone_number"})
USERNAME = re.compile(r"^[a-z0-9][a-z0-9._-]{2,31}$")
EMAIL = re.compile(r"^[a-z0-9!#$%&'*+/=?^_`{|}~.-]+@[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+$")
E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
COMMON_PASSWORDS_FILE = Path(__file__).with_name("common_passwords.txt")

# OWASP's argon2id parameters: 19 MiB, 2 iterations, 1 degree of parallelism.
HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1, hash_len=32, salt_len=16)
# Verified against when the username is unknown, so both failures cost the same time.
_DUMMY_HASH = HASHER.hash(secrets.token_urlsafe(16))


def _invalid(field: str, description: str, reason: str = "INVALID_ARGUMENT") -> DomainError:
    return refused(reason, f"{field}: {description}", field_violations=[(field, description)])


def _load_common_passwords(path: Path) -> frozenset[str]:
    return frozenset(line.strip().lower() for line in path.read_text().splitlines()
                     if line.strip() and not line.startswith("#"))


def _timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def _new_code() -> str:
    return f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}"


def _normal_email(email: str) -> str:
    email = email.strip().lower()
    if len(email) > EMAIL_MAX_LENGTH or not EMAIL.match(email):
        raise _invalid("email", "must be a valid email address")
    return email


def _too_many_attempts(remedy: str) -> DomainError:
    """The code is void for good (no RetryInfo: waiting does not help); the message says what does."""
    return refused("TOO_MANY_ATTEMPTS",
                   f"too many wrong codes; this code no longer works: {remedy}")


@contextlib.asynccontextmanager
async def _answer_no_sooner_than(floor_s: float) -> AsyncIterator[None]:
    """Holds the answer until floor_s after the start, error or not: a request for a known
    address writes more (a code, an event, a commit that waits for the disk) than one for an
    unknown address, a difference of a few ms that many samples would show. Waiting costs no
    CPU (docs/decisions/0015)."""
    started = time.monotonic()
    try:
        yield
    finally:
        await asyncio.sleep(max(0.0, floor_s - (time.monotonic() - started)))


def _bad_credentials() -> DomainError:
    return refused("BAD_CREDENTIALS", "wrong username or password")


def _email_taken() -> DomainError:
    return refused("EMAIL_TAKEN", "a customer with this email already exists")


def _not_found() -> DomainError:
    return refused("CUSTOMER_NOT_FOUND", "no such customer")


def _sha256(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


@dataclass(frozen=True)
class Throttle:
    """Attempts counted in Redis (docs/decisions/0010, 0016). Failed logins count per username
    and client address, per username from anywhere (a slower limit) and per client address; only
    failures count, so a customer's own logins never run into a limit. Requests for codes by
    email count per email and per client address, whatever the answer."""

    limiter: ratelimit.SlidingWindow
    login_by_username_and_address: ratelimit.Limit
    login_by_username: ratelimit.Limit
    login_by_address: ratelimit.Limit
    verify_by_address: ratelimit.Limit
    resend_by_email: ratelimit.Limit = ratelimit.Limit("resend_by_email", CODE_REQUESTS_PER_EMAIL_MAX,
                                                       CODE_REQUESTS_PER_EMAIL_WINDOW_S)
    resend_by_address: ratelimit.Limit = ratelimit.Limit("resend_by_address", CODE_REQUESTS_PER_ADDRESS_MAX,
                                                         CODE_REQUESTS_PER_ADDRESS_WINDOW_S)
    reset_by_email: ratelimit.Limit = ratelimit.Limit("password_reset_by_email", CODE_REQUESTS_PER_EMAIL_MAX,
                                                      CODE_REQUESTS_PER_EMAIL_WINDOW_S)
    reset_by_address: ratelimit.Limit = ratelimit.Limit("password_reset_by_address", CODE_REQUESTS_PER_ADDRESS_MAX,
                                                        CODE_REQUESTS_PER_ADDRESS_WINDOW_S)
    email_change_by_customer: ratelimit.Limit = ratelimit.Limit("email_change_by_customer",
                                                                CODE_REQUESTS_PER_EMAIL_MAX,
                                                                CODE_REQUESTS_PER_EMAIL_WINDOW_S)
    exempt: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def from_settings(cls, limiter: ratelimit.SlidingWindow, s: Settings) -> Throttle:
        return cls(
            limiter,
            login_by_username_and_address=ratelimit.Limit(
                "login_failures_by_username_and_address", s.login_failures_per_username_max,
                s.login_failures_per_username_window_s),
            login_by_username=ratelimit.Limit("login_failures_by_username", USERNAME_FAILURES_MAX,
                                              USERNAME_FAILURES_WINDOW_S),
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

    def login_counts(self, username: str, client_address: str) -> list[ratelimit.Count]:
        """What one password guess for username counts against (unknown usernames too: a limit
        only known ones hit would tell which exist)."""
        return [ratelimit.Count(self.login_by_username_and_address,
                                f"{username}\n{ratelimit.address_subject(client_address)}"),
                ratelimit.Count(self.login_by_username, username),
                *self.by_address(self.login_by_address, client_address)]

    async def check(self, counts: list[ratelimit.Count]) -> None:
        retry_after_s = await self.limiter.retry_after_s(counts)
        if retry_after_s > 0:
            raise ratelimit.rate_limited(retry_after_s)

    async def reserve(self, counts: list[ratelimit.Count]) -> str:
        """Checks and counts one attempt in one step (its place is held until settled)."""
        attempt, retry_after_s = await self.limiter.reserve(counts)
        if retry_after_s > 0:
            raise ratelimit.rate_limited(retry_after_s)
        return attempt

    async def count_request(self, counts: list[ratelimit.Count]) -> None:
        """A request that counts whatever its outcome (codes asked for by email)."""
        attempt = await self.reserve(counts)
        await self.limiter.settle(counts, attempt, failed=True)


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
        email = _normal_email(email)
        full_name = " ".join(full_name.split())
        if not 1 <= len(full_name) <= FULL_NAME_LENGTH_MAX:
            raise _invalid("full_name", f"must be 1 to {FULL_NAME_LENGTH_MAX} characters")
        phone = phone_number.strip() or None
        if phone is not None and not E164.match(phone):
            raise _invalid("phone_number", "must be in E.164 form, e.g. +14155550123")

        customer_id = uuid7()
        code = _new_code()
        now = datetime.now(UTC)
        async with self._pool.connection() as conn, conn.transaction():
            # Registrations of one address take turns (the email's lock), so racing ones never
            # meet the unique index: each discards the one before it, unless it was verified.
            holder = await store.lock_registration(conn, email)
            if holder is not None and holder.email_verified:
                raise refused("EMAIL_TAKEN",
                              "a customer with this email already exists")
            if holder is not None:
                # Never verified: not taken. Only the address's owner can verify the new one.
                await store.delete_unverified_customer(conn, holder.customer_id)
            try:
                customer = await store.insert_customer(conn, customer_id, email, full_name, phone)
            except store.Conflict as exc:  # an email change confirmed to this address meanwhile
                raise refused("EMAIL_TAKEN",
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
            raise refused("CUSTOMER_NOT_FOUND", "no such customer")
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
                raise refused("CUSTOMER_NOT_FOUND", "no such customer")
            if row.used_time is not None:
                raise refused("ALREADY_VERIFIED", "the email is already verified")
            if row.failed_attempts >= CODE_ATTEMPTS_MAX:
                raise _too_many_attempts("ask for a new code (POST /v1/customers:resendVerificationCode) or "
                                         "register again")
            if row.expire_time <= datetime.now(UTC):
                raise refused("CODE_EXPIRED", "the code has expired")
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
            raise refused("CUSTOMER_NOT_FOUND", "no such customer")
        async with self._pool.connection() as conn:
            customer = await store.get_customer(conn, cid)
        if customer is None:
            raise refused("CUSTOMER_NOT_FOUND", "no such customer")
        return customer

    # --- credentials ----------------------------------------------------------------------

    def check_password(self, username: str | None, password: str, field: str = "password") -> None:
        """WEAK_PASSWORD unless the password is strong enough; username None: every rule but
        "does not contain the username" (for a caller not yet proven to own one)."""
        if not PASSWORD_LENGTH_MIN <= len(password) <= PASSWORD_LENGTH_MAX:
            raise _invalid(field, f"must be {PASSWORD_LENGTH_MIN} to {PASSWORD_LENGTH_MAX} characters",
                           "WEAK_PASSWORD")
        lowered = password.lower()
        if lowered in self._common_passwords or len(set(lowered)) <= 2 or (username and username in lowered):
            raise _invalid(field, "is too easy to guess (common, repetitive, or contains the username)",
                           "WEAK_PASSWORD")

    async def create_credential(self, enrollment_token: str, username: str, password: str) -> tuple[str, str]:
        username = username.strip().lower()
        if not USERNAME.match(username):
            raise _invalid("username", "3 to 32 characters: letters, digits, '.', '_' or '-', starting with a letter "
                           "or digit")
        self.check_password(username, password)
        if not enrollment_token or len(enrollment_token) > 256:
            raise refused("INVALID_ENROLLMENT_TOKEN",
                          "the enrollment token is not valid")
        token_hash = _sha256(enrollment_token)
        async with self._pool.connection() as conn:
            live = await store.enrollment_token_is_live(conn, token_hash)
        if not live:
            raise refused("INVALID_ENROLLMENT_TOKEN",
                          "the enrollment token is not valid, used, or expired")
        # Only a live token buys a password hash (argon2id: ~20 ms of a core and 19 MiB), and no
        # more hashes run at once than password checks do.
        async with self._login_slots:
            password_hash = await asyncio.to_thread(HASHER.hash, password)
        async with self._pool.connection() as conn, conn.transaction():
            # Still the deciding step: a use racing this one may have spent the token meanwhile.
            customer_id = await store.use_enrollment_token(conn, token_hash)
            if customer_id is None:
                raise refused("INVALID_ENROLLMENT_TOKEN",
                              "the enrollment token is not valid, used, or expired")
            try:
                await store.insert_credential(conn, uuid7(), username, customer_id, "customer", password_hash)
            except store.Conflict as exc:
                if exc.what == "username":
                    raise refused("USERNAME_TAKEN",
                                  "this username is taken") from exc
                raise refused("CREDENTIAL_EXISTS",
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
        log.info("teller login ready", extra=fields(username=username))

    # --- sessions -------------------------------------------------------------------------

    async def login(self, username: str, password: str, client_address: str) -> IssuedSession:
        username = username.strip().lower()
        counts = self._throttle.login_counts(username, client_address)
        credential, ok = await self._check_password_of(username, password, counts)
        if credential is None or not ok:
            raise _bad_credentials()
        # The right password ends a run of the username's failures from this address (the
        # address's own, and the username's from anywhere, stay counted).
        await self._throttle.limiter.clear(counts[:1])
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

    async def _check_password_of(self, username: str, password: str,
                                 counts: list[ratelimit.Count]) -> tuple[store.Credential | None, bool]:
        """One password guess for username, counted atomically against the failed-login limits:
        its place in each window is taken before the check (RATE_LIMITED when there is none) and
        kept only if the guess was wrong, so guesses sent together cannot pass one check."""
        attempt = await self._throttle.reserve(counts)
        credential: store.Credential | None = None
        ok = False
        decided = False
        try:
            async with self._login_slots:
                if len(username) > 64 or len(password) > PASSWORD_LENGTH_MAX:
                    ok = await asyncio.to_thread(_verifies, _DUMMY_HASH, password[:PASSWORD_LENGTH_MAX])
                else:
                    async with self._pool.connection() as conn:
                        credential = await store.get_credential(conn, username)
                    # The same work whether or not the user exists, so timing tells nothing.
                    ok = await asyncio.to_thread(_verifies, credential.password_hash if credential else _DUMMY_HASH,
                                                 password)
            decided = True
        finally:
            # An attempt that failed for another reason (storage down) is not a wrong guess.
            await self._throttle.limiter.settle(counts, attempt, failed=decided and (credential is None or not ok))
        return credential, ok

    async def refresh_session(self, refresh_token: str) -> IssuedSession:
        invalid = refused("INVALID_REFRESH_TOKEN", "the refresh token is not valid")
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
            log.warning("refresh token reused; session revoked", extra=fields(session_id=str(revoked)))
        if state.revoked_time is not None or revoked is not None:
            raise refused("SESSION_REVOKED", "the session has been revoked")
        if state.refresh_expire_time <= datetime.now(UTC):
            raise refused("SESSION_EXPIRED", "the session has expired; log in again")
        role = auth.Role(state.role)
        access = self._issuer.issue(state.subject, role, str(state.session_id))
        return IssuedSession(str(state.session_id), state.subject if role is auth.Role.CUSTOMER else "", access,
                             new_token, state.refresh_expire_time)

    async def logout(self, caller: auth.Caller, session_id: str) -> None:
        sid = parse_uuid(session_id)
        async with self._pool.connection() as conn, conn.transaction():
            session = await store.get_session(conn, sid) if sid else None
            if session is None or session.subject != caller.subject or session.role != caller.role.value:
                raise refused("SESSION_NOT_FOUND", "no such session")
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
            raise refused("CUSTOMER_NOT_FOUND", "no such customer")
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

    # --- recovery and profile (API.md, "v1 additions") ------------------------------------
    # The requests without a token that name an email answer the same way for every address,
    # known or not, and do about the same work (docs/decisions/0015).

    def _reset_code_hash(self, email: str, code: str) -> bytes:
        return hmac.new(self._code_key, f"password-reset:{email}:{code}".encode(), hashlib.sha256).digest()

    def _email_change_code_hash(self, customer_id: UUID, code: str) -> bytes:
        return hmac.new(self._code_key, f"email-change:{customer_id}:{code}".encode(), hashlib.sha256).digest()

    async def resend_verification_code(self, email: str, client_address: str) -> None:
        async with _answer_no_sooner_than(ANSWER_FLOOR_S):
            await self._resend_verification_code(_normal_email(email), client_address)

    async def _resend_verification_code(self, email: str, client_address: str) -> None:
        await self._throttle.count_request([ratelimit.Count(self._throttle.resend_by_email, email),
                                            *self._throttle.by_address(self._throttle.resend_by_address,
                                                                       client_address)])
        code = _new_code()
        async with self._pool.connection() as conn, conn.transaction():
            holder = await store.lock_registration(conn, email)
            if holder is None or holder.email_verified:
                return  # nothing to send, and nothing said about it
            # One code per customer: the new one replaces the old, whose wrong tries go with it.
            await store.set_verification_code(conn, holder.customer_id, self._code_hash(holder.customer_id, code),
                                              datetime.now(UTC) + CODE_TTL)
            event = events_pb2.VerificationCodeResent(
                event_id=new_id(), customer_id=str(holder.customer_id), email=holder.email,
                full_name=holder.full_name, verification_code=code, create_time=_timestamp(datetime.now(UTC)))
            await events.append(conn, events.OutboxEvent(events.CUSTOMER_TOPIC, str(holder.customer_id), event))

    async def request_password_reset(self, email: str, client_address: str) -> None:
        async with _answer_no_sooner_than(ANSWER_FLOOR_S):
            await self._request_password_reset(_normal_email(email), client_address)

    async def _request_password_reset(self, email: str, client_address: str) -> None:
        await self._throttle.count_request([ratelimit.Count(self._throttle.reset_by_email, email),
                                            *self._throttle.by_address(self._throttle.reset_by_address,
                                                                       client_address)])
        code = _new_code()
        async with self._pool.connection() as conn, conn.transaction():
            target = await store.reset_target(conn, email)
            # The same row for an unknown address, with a code nobody is sent: the same work, and
            # ResetPassword answers both alike (wrong tries counted, TOO_MANY_ATTEMPTS after 5).
            stored_code = code if target is not None else secrets.token_hex(16)
            await store.set_password_reset(conn, email, target[0] if target else None,
                                           self._reset_code_hash(email, stored_code), datetime.now(UTC) + CODE_TTL)
            if target is not None:
                event = events_pb2.PasswordResetRequested(event_id=new_id(), customer_id=str(target[0]), email=email,
                                                          reset_code=code, create_time=_timestamp(datetime.now(UTC)))
                await events.append(conn, events.OutboxEvent(events.CUSTOMER_TOPIC, str(target[0]), event))

    async def reset_password(self, email: str, code: str, new_password: str, client_address: str) -> None:
        email = _normal_email(email)
        if not code.isdigit() or len(code) != CODE_DIGITS:
            raise _invalid("code", f"must be the {CODE_DIGITS}-digit code from the email", "INVALID_CODE")
        # Every rule but the username's: that one only once the code proved who is asking.
        self.check_password(None, new_password, "new_password")
        code_hash = self._reset_code_hash(email, code)
        by_address = self._throttle.by_address(self._throttle.verify_by_address, client_address)
        async with self._verify_slots:
            attempt = await self._throttle.reserve(by_address)
            wrong = False
            try:
                async with self._pool.connection() as conn, conn.transaction():
                    row = await store.lock_password_reset(conn, email)
                    target = await store.reset_target(conn, email)
                    if row is not None and row.failed_attempts >= CODE_ATTEMPTS_MAX:
                        raise _too_many_attempts("ask for a new one (POST /v1/credentials:requestPasswordReset)")
                    wrong = row is None or not hmac.compare_digest(row.code_hash, code_hash)
                    if row is not None and wrong:
                        await store.count_failed_reset(conn, email)  # committed: raised after the block
            finally:
                await self._throttle.limiter.settle(by_address, attempt, failed=wrong)
        if wrong:
            raise _invalid("code", "is not the code we sent", "INVALID_CODE")
        assert row is not None
        # Only the holder of the right code learns that it expired.
        if row.expire_time <= datetime.now(UTC):
            raise refused("CODE_EXPIRED", "the code has expired")
        if target is None or row.customer_id != target[0]:
            # The address changed hands since the code was sent: the code is of no use.
            raise _invalid("code", "is not the code we sent", "INVALID_CODE")
        customer_id, username = target
        self.check_password(username, new_password, "new_password")
        async with self._login_slots:
            password_hash = await asyncio.to_thread(HASHER.hash, new_password)
        async with self._pool.connection() as conn, conn.transaction():
            # Spent here, in one transaction with its effect: two racing resets cannot both win.
            again = await store.lock_password_reset(conn, email)
            if again is None or again.code_hash != code_hash:
                raise _invalid("code", "is not the code we sent", "INVALID_CODE")
            await store.use_password_reset(conn, email)
            await store.set_password(conn, customer_id, password_hash)
            revoked = await store.revoke_customer_sessions(conn, customer_id, "password reset")
            await self._password_changed(conn, customer_id, email, events_pb2.PasswordChanged.RESET)
        await self._revoke_now(revoked)
        # The reset lifts the username's failed-login limits (from anywhere, and from here): the
        # lever of locking an owner out by guessing wrong is gone (docs/decisions/0016).
        await self._throttle.limiter.clear(self._throttle.login_counts(username, client_address)[:2])

    async def change_password(self, caller: auth.Caller, current_password: str, new_password: str,
                              client_address: str) -> None:
        if caller.role is not auth.Role.CUSTOMER or caller.customer_id is None:
            raise refused("CUSTOMER_ONLY", "only customers change passwords here")
        customer_id = UUID(caller.customer_id)
        async with self._pool.connection() as conn:
            credential = await store.get_customer_credential(conn, customer_id)
        if credential is None:
            raise _bad_credentials()
        self.check_password(credential.username, new_password, "new_password")
        counts = self._throttle.login_counts(credential.username, client_address)
        _, ok = await self._check_password_of(credential.username, current_password, counts)
        if not ok:
            raise _bad_credentials()
        async with self._login_slots:
            password_hash = await asyncio.to_thread(HASHER.hash, new_password)
        keep = parse_uuid(caller.session_id or "")
        async with self._pool.connection() as conn, conn.transaction():
            customer = await store.get_customer(conn, customer_id)
            assert customer is not None
            await store.set_password(conn, customer_id, password_hash)
            revoked = await store.revoke_customer_sessions(conn, customer_id, "password change", keep=keep)
            await self._password_changed(conn, customer_id, customer.email, events_pb2.PasswordChanged.CHANGE)
        await self._revoke_now(revoked)

    async def _password_changed(self, conn: Any, customer_id: UUID, email: str,
                                method: events_pb2.PasswordChanged.Method.ValueType) -> None:
        event = events_pb2.PasswordChanged(event_id=new_id(), customer_id=str(customer_id), email=email, method=method,
                                           create_time=_timestamp(datetime.now(UTC)))
        await events.append(conn, events.OutboxEvent(events.CUSTOMER_TOPIC, str(customer_id), event))

    async def _revoke_now(self, session_ids: list[UUID]) -> None:
        """After commit: every token of these sessions is refused by every service from here on."""
        # A few at a time: the Redis pool is bounded and shared with every other request (all
        # at once, a customer with hundreds of sessions emptied it: MaxConnectionsError).
        for start in range(0, len(session_ids), REVOCATIONS_AT_ONCE_MAX):
            await asyncio.gather(*(self._revocations.revoke(str(sid))
                                   for sid in session_ids[start:start + REVOCATIONS_AT_ONCE_MAX]))

    def _own(self, caller: auth.Caller, customer_id: str) -> UUID:
        """The caller's own customer id, named in the request; anyone else's (a teller's too: they
        never act for a customer) is not found."""
        cid = parse_uuid(customer_id)
        if cid is None or caller.customer_id != str(cid):
            raise _not_found()
        return cid

    async def update_customer(self, caller: auth.Caller, customer_id: str, paths: list[str], full_name: str,
                              phone_number: str) -> store.Customer:
        cid = self._own(caller, customer_id)
        if not paths:
            raise _invalid("update_mask", f"must name the fields to change: {', '.join(sorted(MUTABLE_FIELDS))}")
        refused = sorted(set(paths) - MUTABLE_FIELDS)
        if refused:
            raise _invalid("update_mask", f"cannot change {', '.join(refused)}; only "
                                          f"{', '.join(sorted(MUTABLE_FIELDS))}")
        changes: dict[str, str | None] = {}
        if "full_name" in paths:
            name = " ".join(full_name.split())
            if not 1 <= len(name) <= FULL_NAME_LENGTH_MAX:
                raise _invalid("customer.full_name", f"must be 1 to {FULL_NAME_LENGTH_MAX} characters")
            changes["full_name"] = name
        if "phone_number" in paths:
            phone = phone_number.strip() or None
            if phone is not None and not E164.match(phone):
                raise _invalid("customer.phone_number", "must be in E.164 form, e.g. +14155550123")
            changes["phone_number"] = phone
        async with self._pool.connection() as conn, conn.transaction():
            customer = await store.update_profile(conn, cid, changes)
        if customer is None:
            raise _not_found()
        return customer

    async def change_email(self, caller: auth.Caller, customer_id: str, new_email: str) -> store.Customer:
        cid = self._own(caller, customer_id)
        new_email = _normal_email(new_email)
        async with self._pool.connection() as conn:
            customer = await store.get_customer(conn, cid)
        if customer is None:
            raise _not_found()
        if new_email == customer.email:
            raise _invalid("new_email", "is already the customer's email")
        await self._throttle.count_request([ratelimit.Count(self._throttle.email_change_by_customer, str(cid))])
        code = _new_code()
        async with self._pool.connection() as conn, conn.transaction():
            holder = await store.get_customer_by_email(conn, new_email)
            if holder is not None and holder.email_verified:
                raise _email_taken()
            await store.set_email_change(conn, cid, new_email, self._email_change_code_hash(cid, code),
                                         datetime.now(UTC) + CODE_TTL)
            event = events_pb2.EmailChangeRequested(event_id=new_id(), customer_id=str(cid), new_email=new_email,
                                                    verification_code=code, create_time=_timestamp(datetime.now(UTC)))
            await events.append(conn, events.OutboxEvent(events.CUSTOMER_TOPIC, str(cid), event))
        return customer

    async def confirm_email_change(self, caller: auth.Caller, customer_id: str, code: str,
                                   client_address: str) -> store.Customer:
        cid = self._own(caller, customer_id)
        if not code.isdigit() or len(code) != CODE_DIGITS:
            raise _invalid("code", f"must be the {CODE_DIGITS}-digit code from the email", "INVALID_CODE")
        by_address = self._throttle.by_address(self._throttle.verify_by_address, client_address)
        async with self._verify_slots:
            attempt = await self._throttle.reserve(by_address)
            wrong = False
            try:
                customer = await self._confirm_email_change(cid, code)
            except DomainError as exc:
                wrong = exc.reason == "INVALID_CODE"
                raise
            finally:
                await self._throttle.limiter.settle(by_address, attempt, failed=wrong)
        return customer

    async def _confirm_email_change(self, cid: UUID, code: str) -> store.Customer:
        failure: DomainError | None = None
        async with self._pool.connection() as conn, conn.transaction():
            pending = await store.lock_email_change(conn, cid)
            if pending is None:
                raise refused("NO_EMAIL_CHANGE",
                              "no change of email is pending; ask for one first")
            if pending.failed_attempts >= CODE_ATTEMPTS_MAX:
                raise _too_many_attempts("ask for a new one (POST /v1/customers/{customer_id}:changeEmail)")
            if pending.expire_time <= datetime.now(UTC):
                raise refused("CODE_EXPIRED", "the code has expired")
            if not hmac.compare_digest(pending.code_hash, self._email_change_code_hash(cid, code)):
                await store.count_failed_email_change(conn, cid)  # committed: raised after the block
                failure = _invalid("code", "is not the code we sent", "INVALID_CODE")
            else:
                old = await store.get_customer(conn, cid)
                assert old is not None
                holder = await store.lock_registration(conn, pending.new_email)
                if holder is not None and holder.email_verified:
                    raise _email_taken()
                if holder is not None:  # an unverified registration of the address: not taken
                    await store.delete_unverified_customer(conn, holder.customer_id)
                customer = await store.apply_email_change(conn, cid, pending.new_email)
                event = events_pb2.EmailChanged(event_id=new_id(), customer_id=str(cid), old_email=old.email,
                                                new_email=customer.email, create_time=_timestamp(datetime.now(UTC)))
                await events.append(conn, events.OutboxEvent(events.CUSTOMER_TOPIC, str(cid), event))
        if failure is not None:
            raise failure
        return customer

    async def sweep(self) -> tuple[int, int]:
        """Removes unverified registrations older than UNVERIFIED_TTL and stale password reset
        rows, a bounded batch of each; how many of each went."""
        now = datetime.now(UTC)
        async with self._pool.connection() as conn, conn.transaction():
            registrations = await store.delete_stale_registrations(conn, now - UNVERIFIED_TTL, SWEEP_BATCH_MAX)
            resets = await store.delete_stale_password_resets(conn, now - PASSWORD_RESET_ROW_TTL, SWEEP_BATCH_MAX)
        return registrations, resets

    async def customer_profile(self, customer_id: str) -> store.Customer:
        cid = parse_uuid(customer_id)
        async with self._pool.connection() as conn:
            customer = await store.get_customer(conn, cid) if cid else None
        if customer is None:
            raise refused("CUSTOMER_NOT_FOUND", "no such customer")
        return customer


def _verifies(password_hash: str, password: str) -> bool:
    try:
        return HASHER.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False

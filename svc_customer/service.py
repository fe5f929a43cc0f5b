"""svc_customer's use cases: registration, email verification, credentials and sessions, and
account recovery and profile (resend, password reset and change, profile and email changes).

Each function reads like the rules of ../shared/API.md. Costs: registration and verification
are one Postgres transaction each (the event goes to the outbox in it); login is one read, one
argon2id verification (~tens of ms of CPU, run off the event loop) and one transaction;
refresh is one transaction; logout is one transaction and one Redis write. Login and
verification also ask Redis about failed attempts (one script call before, one more after a
failure or a login): see Throttle. A password reset or change costs one argon2id hash and ends
sessions (one Redis write each); the requests naming an email answer after ANSWER_FLOOR_S.

One async function per operation (docs/decisions/0018): each takes what it touches as
parameters (the store, Codes, Passwords, Throttle, the revocations, the token issuer), then
the caller and the request's fields, and raises domain errors by reason. The store and Redis
are typed by the small Protocols below, which the real adapters and the fakes of tests/unit
both satisfy.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol
from uuid import UUID

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from bank.events.v1 import events_pb2
from google.protobuf.timestamp_pb2 import Timestamp

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
# Code checks at once per process (Codes.checks).
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


class Tx(Protocol):
    """What a use case does to the tables in one connection or transaction: store.Tx, or the
    fake of tests/unit."""

    async def append_event(self, event: events.OutboxEvent) -> None: ...
    async def insert_customer(self, customer_id: UUID, email: str, full_name: str,
                              phone_number: str | None) -> store.Customer: ...
    async def get_customer(self, customer_id: UUID) -> store.Customer | None: ...
    async def set_verification_code(self, customer_id: UUID, code_hash: bytes, expire_time: datetime) -> None: ...
    async def lock_verification_code(self, customer_id: UUID) -> store.VerificationCode | None: ...
    async def count_failed_attempt(self, customer_id: UUID) -> None: ...
    async def mark_email_verified(self, customer_id: UUID) -> store.Customer: ...
    async def insert_enrollment_token(self, token_hash: bytes, customer_id: UUID, expire_time: datetime) -> None: ...
    async def enrollment_token_is_live(self, token_hash: bytes) -> bool: ...
    async def use_enrollment_token(self, token_hash: bytes) -> UUID | None: ...
    async def insert_credential(self, credential_id: UUID, username: str, customer_id: UUID | None, role: str,
                                password_hash: str) -> None: ...
    async def upsert_teller(self, credential_id: UUID, username: str, password_hash: str) -> None: ...
    async def get_credential(self, username: str) -> store.Credential | None: ...
    async def update_password_hash(self, credential_id: UUID, password_hash: str) -> None: ...
    async def insert_session(self, session_id: UUID, credential_id: UUID, subject: str, role: str,
                             refresh_hash: bytes, refresh_expire_time: datetime) -> None: ...
    async def lock_refresh_token(self, token_hash: bytes) -> store.RefreshTokenState | None: ...
    async def rotate_refresh_token(self, old_hash: bytes, new_hash: bytes, session_id: UUID) -> None: ...
    async def get_session(self, session_id: UUID) -> store.Session | None: ...
    async def revoke_session(self, session_id: UUID, reason: str) -> None: ...
    async def list_active_sessions(self, customer_id: UUID, after: tuple[datetime, UUID] | None,
                                   limit: int) -> list[store.ActiveSession]: ...
    async def lock_registration(self, email: str) -> store.Customer | None: ...
    async def delete_unverified_customer(self, customer_id: UUID) -> bool: ...
    async def delete_stale_registrations(self, older_than: datetime, limit: int) -> int: ...
    async def delete_stale_password_resets(self, older_than: datetime, limit: int) -> int: ...
    async def get_customer_by_email(self, email: str) -> store.Customer | None: ...
    async def get_customer_credential(self, customer_id: UUID) -> store.Credential | None: ...
    async def reset_target(self, email: str) -> tuple[UUID, str] | None: ...
    async def set_password_reset(self, email: str, customer_id: UUID | None, code_hash: bytes,
                                 expire_time: datetime) -> None: ...
    async def lock_password_reset(self, email: str) -> store.PendingCode | None: ...
    async def count_failed_reset(self, email: str) -> None: ...
    async def use_password_reset(self, email: str) -> None: ...
    async def set_password(self, customer_id: UUID, password_hash: str) -> None: ...
    async def revoke_customer_sessions(self, customer_id: UUID, reason: str,
                                       keep: UUID | None = None) -> list[UUID]: ...
    async def update_profile(self, customer_id: UUID, changes: dict[str, str | None]) -> store.Customer | None: ...
    async def set_email_change(self, customer_id: UUID, new_email: str, code_hash: bytes,
                               expire_time: datetime) -> None: ...
    async def lock_email_change(self, customer_id: UUID) -> store.PendingCode | None: ...
    async def count_failed_email_change(self, customer_id: UUID) -> None: ...
    async def apply_email_change(self, customer_id: UUID, new_email: str) -> store.Customer: ...


class Customers(Protocol):
    """The tables of schema customer: store.CustomerStore, or the fake of tests/unit."""

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Tx]: ...

    def connection(self) -> contextlib.AbstractAsyncContextManager[Tx]: ...


class Limiter(Protocol):
    """Attempts counted in sliding windows: ratelimit.SlidingWindow (Redis), or the fake of tests/unit."""

    async def retry_after_s(self, counts: Sequence[ratelimit.Count]) -> float: ...
    async def record(self, counts: Sequence[ratelimit.Count]) -> None: ...
    async def clear(self, counts: Sequence[ratelimit.Count]) -> None: ...
    async def reserve(self, counts: Sequence[ratelimit.Count]) -> tuple[str, float]: ...
    async def settle(self, counts: Sequence[ratelimit.Count], attempt: str, *, failed: bool) -> None: ...


class Revocations(Protocol):
    """Sessions whose tokens every service refuses from now on: auth.Revocations (Redis), or the fake."""

    async def revoke(self, session_id: str) -> None: ...


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

    limiter: Limiter
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
    def from_settings(cls, limiter: Limiter, s: Settings) -> Throttle:
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


class Codes:
    """The six-digit codes sent by email (email verification, password reset, email change) and
    how many are checked at once. Codes are short: stored as an HMAC under a server-side key,
    so a copy of the tables alone does not give them away."""

    def __init__(self, service_token: str) -> None:
        self._key = hmac.new(service_token.encode(), b"verification-code", hashlib.sha256).digest()
        # Code checks at once per process: the per-address limit is checked before a wrong code
        # is counted, so at most this many guesses sent in parallel can pass one check together.
        self.checks = asyncio.Semaphore(VERIFICATIONS_IN_FLIGHT_MAX)

    def verification(self, customer_id: UUID, code: str) -> bytes:
        return hmac.new(self._key, f"{customer_id}:{code}".encode(), hashlib.sha256).digest()

    def password_reset(self, email: str, code: str) -> bytes:
        return hmac.new(self._key, f"password-reset:{email}:{code}".encode(), hashlib.sha256).digest()

    def email_change(self, customer_id: UUID, code: str) -> bytes:
        return hmac.new(self._key, f"email-change:{customer_id}:{code}".encode(), hashlib.sha256).digest()


class Passwords:
    """What a new password must be, and argon2id: hashes and checks run off the event loop, and
    where a request without a login can ask for one, at most LOGINS_IN_FLIGHT_MAX at once per
    process (the slots)."""

    def __init__(self, common_passwords_file: Path = COMMON_PASSWORDS_FILE, hasher: PasswordHasher = HASHER) -> None:
        self._common = _load_common_passwords(common_passwords_file)
        self.hasher = hasher
        self.slots = asyncio.Semaphore(LOGINS_IN_FLIGHT_MAX)
        # Verified against when the username is unknown, so both failures cost the same time.
        self.dummy_hash = hasher.hash(secrets.token_urlsafe(16))

    def check(self, username: str | None, password: str, field: str = "password") -> None:
        """WEAK_PASSWORD unless the password is strong enough; username None: every rule but
        "does not contain the username" (for a caller not yet proven to own one)."""
        if not PASSWORD_LENGTH_MIN <= len(password) <= PASSWORD_LENGTH_MAX:
            raise _invalid(field, f"must be {PASSWORD_LENGTH_MIN} to {PASSWORD_LENGTH_MAX} characters",
                           "WEAK_PASSWORD")
        lowered = password.lower()
        if lowered in self._common or len(set(lowered)) <= 2 or (username and username in lowered):
            raise _invalid(field, "is too easy to guess (common, repetitive, or contains the username)",
                           "WEAK_PASSWORD")

    async def hash(self, password: str) -> str:
        return await asyncio.to_thread(self.hasher.hash, password)

    async def verifies(self, password_hash: str, password: str) -> bool:
        return await asyncio.to_thread(self._verifies, password_hash, password)

    def _verifies(self, password_hash: str, password: str) -> bool:
        try:
            return self.hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return False


# --- registration and verification ----------------------------------------------------------

async def register_customer(customers: Customers, codes: Codes, email: str, full_name: str,
                            phone_number: str) -> store.Customer:
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
    async with customers.transaction() as tx:
        # Registrations of one address take turns (the email's lock), so racing ones never
        # meet the unique index: each discards the one before it, unless it was verified.
        holder = await tx.lock_registration(email)
        if holder is not None and holder.email_verified:
            raise _email_taken()
        if holder is not None:
            # Never verified: not taken. Only the address's owner can verify the new one.
            await tx.delete_unverified_customer(holder.customer_id)
        try:
            customer = await tx.insert_customer(customer_id, email, full_name, phone)
        except store.Conflict as exc:  # an email change confirmed to this address meanwhile
            raise _email_taken() from exc
        await tx.set_verification_code(customer_id, codes.verification(customer_id, code), now + CODE_TTL)
        event = events_pb2.CustomerRegistered(
            event_id=new_id(), customer_id=str(customer_id), email=email, full_name=full_name,
            verification_code=code, create_time=_timestamp(customer.create_time),
        )
        await tx.append_event(events.OutboxEvent(events.CUSTOMER_TOPIC, str(customer_id), event))
    return customer


async def verify_email(customers: Customers, codes: Codes, throttle: Throttle, customer_id: str, code: str,
                       client_address: str) -> tuple[store.Customer, str]:
    cid = parse_uuid(customer_id)
    if cid is None:
        raise _not_found()
    if not code.isdigit() or len(code) != CODE_DIGITS:
        raise _invalid("code", f"must be the {CODE_DIGITS}-digit code from the email", "INVALID_CODE")
    # Wrong codes per customer are capped in Postgres (TOO_MANY_ATTEMPTS, for good); per client
    # address, here: someone guessing across many registrations.
    by_address = throttle.by_address(throttle.verify_by_address, client_address)
    async with codes.checks:
        return await _check_code(customers, codes, throttle, cid, code, by_address)


async def _check_code(customers: Customers, codes: Codes, throttle: Throttle, cid: UUID, code: str,
                      by_address: list[ratelimit.Count]) -> tuple[store.Customer, str]:
    """verify_email's check, from the limit to the counted failure, in one verification slot."""
    await throttle.check(by_address)
    failure: DomainError | None = None
    enrollment_token = secrets.token_urlsafe(32)
    async with customers.transaction() as tx:
        row = await tx.lock_verification_code(cid)
        if row is None:
            raise _not_found()
        if row.used_time is not None:
            raise refused("ALREADY_VERIFIED", "the email is already verified")
        if row.failed_attempts >= CODE_ATTEMPTS_MAX:
            raise _too_many_attempts("ask for a new code (POST /v1/customers:resendVerificationCode) or "
                                     "register again")
        if row.expire_time <= datetime.now(UTC):
            raise refused("CODE_EXPIRED", "the code has expired")
        if not hmac.compare_digest(row.code_hash, codes.verification(cid, code)):
            # Counted in this transaction, which commits: the error is raised after it.
            await tx.count_failed_attempt(cid)
            failure = _invalid("code", "is not the code we sent", "INVALID_CODE")
        else:
            customer = await tx.mark_email_verified(cid)
            assert customer.email_verified, f"customer {cid} verified but not marked so"
            await tx.insert_enrollment_token(_sha256(enrollment_token), cid, datetime.now(UTC) + ENROLLMENT_TTL)
            event = events_pb2.EmailVerified(event_id=new_id(), customer_id=str(cid), email=customer.email,
                                             create_time=_timestamp(datetime.now(UTC)))
            await tx.append_event(events.OutboxEvent(events.CUSTOMER_TOPIC, str(cid), event))
    if failure is not None:
        await throttle.limiter.record(by_address)
        raise failure
    return customer, enrollment_token


async def get_customer(customers: Customers, caller: auth.Caller, customer_id: str) -> store.Customer:
    cid = parse_uuid(customer_id)
    # Another customer's record is never revealed: not found, as if it did not exist.
    if cid is None or not (caller.is_teller or caller.customer_id == str(cid)):
        raise _not_found()
    async with customers.connection() as tx:
        customer = await tx.get_customer(cid)
    if customer is None:
        raise _not_found()
    return customer


# --- credentials ----------------------------------------------------------------------------

async def create_credential(customers: Customers, passwords: Passwords, enrollment_token: str, username: str,
                            password: str) -> tuple[str, str]:
    username = username.strip().lower()
    if not USERNAME.match(username):
        raise _invalid("username", "3 to 32 characters: letters, digits, '.', '_' or '-', starting with a letter "
                       "or digit")
    passwords.check(username, password)
    if not enrollment_token or len(enrollment_token) > 256:
        raise refused("INVALID_ENROLLMENT_TOKEN", "the enrollment token is not valid")
    token_hash = _sha256(enrollment_token)
    async with customers.connection() as tx:
        live = await tx.enrollment_token_is_live(token_hash)
    if not live:
        raise refused("INVALID_ENROLLMENT_TOKEN", "the enrollment token is not valid, used, or expired")
    # Only a live token buys a password hash (argon2id: ~20 ms of a core and 19 MiB), and no
    # more hashes run at once than password checks do.
    async with passwords.slots:
        password_hash = await passwords.hash(password)
    async with customers.transaction() as tx:
        # Still the deciding step: a use racing this one may have spent the token meanwhile.
        customer_id = await tx.use_enrollment_token(token_hash)
        if customer_id is None:
            raise refused("INVALID_ENROLLMENT_TOKEN", "the enrollment token is not valid, used, or expired")
        try:
            await tx.insert_credential(uuid7(), username, customer_id, "customer", password_hash)
        except store.Conflict as exc:
            if exc.what == "username":
                raise refused("USERNAME_TAKEN", "this username is taken") from exc
            raise refused("CREDENTIAL_EXISTS", "this customer already has credentials") from exc
    return str(customer_id), username


async def ensure_teller(customers: Customers, passwords: Passwords, username: str, password: str) -> None:
    """The local teller login, from BANK_TELLER_USERNAME / BANK_TELLER_PASSWORD."""
    username = username.strip().lower()
    if not username or not password:
        return
    async with customers.connection() as tx:
        existing = await tx.get_credential(username)
    if existing is not None and existing.role != "teller":
        raise RuntimeError(f"BANK_TELLER_USERNAME={username!r} belongs to a customer")
    if existing is not None and await passwords.verifies(existing.password_hash, password):
        return
    password_hash = await passwords.hash(password)
    async with customers.transaction() as tx:
        await tx.upsert_teller(uuid7(), username, password_hash)
    log.info("teller login ready", extra=fields(username=username))


# --- sessions -------------------------------------------------------------------------------

async def login(customers: Customers, passwords: Passwords, throttle: Throttle, issuer: auth.TokenIssuer,
                username: str, password: str, client_address: str, *, refresh_ttl: timedelta) -> IssuedSession:
    username = username.strip().lower()
    counts = throttle.login_counts(username, client_address)
    credential, ok = await _check_password_of(customers, passwords, throttle, username, password, counts)
    if credential is None or not ok:
        raise _bad_credentials()
    # The right password ends a run of the username's failures from this address (the
    # address's own, and the username's from anywhere, stay counted).
    await throttle.limiter.clear(counts[:1])
    if passwords.hasher.check_needs_rehash(credential.password_hash):
        new_hash = await passwords.hash(password)
        async with customers.connection() as tx:
            await tx.update_password_hash(credential.credential_id, new_hash)
    role = auth.Role(credential.role)
    subject = str(credential.customer_id) if role is auth.Role.CUSTOMER else str(credential.credential_id)
    session_id = uuid7()
    refresh_token = secrets.token_urlsafe(32)
    refresh_expire = datetime.now(UTC) + refresh_ttl
    async with customers.transaction() as tx:
        await tx.insert_session(session_id, credential.credential_id, subject, role.value, _sha256(refresh_token),
                                refresh_expire)
    access = issuer.issue(subject, role, str(session_id))
    return IssuedSession(str(session_id), subject if role is auth.Role.CUSTOMER else "", access, refresh_token,
                         refresh_expire)


async def _check_password_of(customers: Customers, passwords: Passwords, throttle: Throttle, username: str,
                             password: str, counts: list[ratelimit.Count]) -> tuple[store.Credential | None, bool]:
    """One password guess for username, counted atomically against the failed-login limits:
    its place in each window is taken before the check (RATE_LIMITED when there is none) and
    kept only if the guess was wrong, so guesses sent together cannot pass one check."""
    attempt = await throttle.reserve(counts)
    credential: store.Credential | None = None
    ok = False
    decided = False
    try:
        async with passwords.slots:
            if len(username) > 64 or len(password) > PASSWORD_LENGTH_MAX:
                ok = await passwords.verifies(passwords.dummy_hash, password[:PASSWORD_LENGTH_MAX])
            else:
                async with customers.connection() as tx:
                    credential = await tx.get_credential(username)
                # The same work whether or not the user exists, so timing tells nothing.
                ok = await passwords.verifies(credential.password_hash if credential else passwords.dummy_hash,
                                              password)
        decided = True
    finally:
        # An attempt that failed for another reason (storage down) is not a wrong guess.
        await throttle.limiter.settle(counts, attempt, failed=decided and (credential is None or not ok))
    return credential, ok


async def refresh_session(customers: Customers, revocations: Revocations, issuer: auth.TokenIssuer,
                          refresh_token: str) -> IssuedSession:
    invalid = refused("INVALID_REFRESH_TOKEN", "the refresh token is not valid")
    if not refresh_token or len(refresh_token) > 256:
        raise invalid
    presented = _sha256(refresh_token)
    new_token = secrets.token_urlsafe(32)
    revoked: UUID | None = None
    async with customers.transaction() as tx:
        state = await tx.lock_refresh_token(presented)
        if state is None:
            raise invalid
        if state.revoked_time is None and state.rotated_time is not None:
            # A rotated token came back: someone holds a copy. Revoke the whole session.
            await tx.revoke_session(state.session_id, "refresh token reuse")
            revoked = state.session_id
        elif state.revoked_time is None and state.refresh_expire_time > datetime.now(UTC):
            await tx.rotate_refresh_token(presented, _sha256(new_token), state.session_id)
    if revoked is not None:
        await revocations.revoke(str(revoked))
        log.warning("refresh token reused; session revoked", extra=fields(session_id=str(revoked)))
    if state.revoked_time is not None or revoked is not None:
        raise refused("SESSION_REVOKED", "the session has been revoked")
    if state.refresh_expire_time <= datetime.now(UTC):
        raise refused("SESSION_EXPIRED", "the session has expired; log in again")
    role = auth.Role(state.role)
    access = issuer.issue(state.subject, role, str(state.session_id))
    return IssuedSession(str(state.session_id), state.subject if role is auth.Role.CUSTOMER else "", access,
                         new_token, state.refresh_expire_time)


async def logout(customers: Customers, revocations: Revocations, caller: auth.Caller, session_id: str) -> None:
    sid = parse_uuid(session_id)
    async with customers.transaction() as tx:
        session = await tx.get_session(sid) if sid else None
        if session is None or session.subject != caller.subject or session.role != caller.role.value:
            raise refused("SESSION_NOT_FOUND", "no such session")
        assert sid is not None
        await tx.revoke_session(sid, "logout")
    # After commit: from here on every token of the session is refused by every service.
    await revocations.revoke(str(sid))


async def list_sessions(customers: Customers, caller: auth.Caller, customer_id: str, page_size: int,
                        page_token: str) -> tuple[list[store.ActiveSession], str]:
    """The customer's active sessions, newest first; nobody else's (a teller's neither)."""
    size = pagination.page_size(page_size)
    key = pagination.decode_token(page_token, 2)
    cid = parse_uuid(customer_id)
    if cid is None or caller.customer_id != str(cid):
        raise _not_found()
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
    async with customers.connection() as tx:
        rows = await tx.list_active_sessions(cid, after, size + 1)
    page = rows[:size]
    token = pagination.encode_token([page[-1].create_time.isoformat(), str(page[-1].session_id)]) \
        if len(rows) > size else ""
    return page, token


# --- recovery and profile (API.md, "v1 additions") ------------------------------------------
# The requests without a token that name an email answer the same way for every address,
# known or not, and do about the same work (docs/decisions/0015).

# A request that names an address: (customers, codes, throttle, email, client_address).
_AddressRequest = Callable[[Customers, Codes, Throttle, str, str], Awaitable[None]]


def _answered_alike(use_case: _AddressRequest) -> _AddressRequest:
    """The use case gets the address normalised, and its answer, error or not, comes no sooner
    than ANSWER_FLOOR_S after the request."""
    @functools.wraps(use_case)
    async def answered(customers: Customers, codes: Codes, throttle: Throttle, email: str,
                       client_address: str) -> None:
        async with _answer_no_sooner_than(ANSWER_FLOOR_S):
            await use_case(customers, codes, throttle, _normal_email(email), client_address)
    return answered


@_answered_alike
async def resend_verification_code(customers: Customers, codes: Codes, throttle: Throttle, email: str,
                                   client_address: str) -> None:
    await throttle.count_request([ratelimit.Count(throttle.resend_by_email, email),
                                  *throttle.by_address(throttle.resend_by_address, client_address)])
    code = _new_code()
    async with customers.transaction() as tx:
        holder = await tx.lock_registration(email)
        if holder is None or holder.email_verified:
            return  # nothing to send, and nothing said about it
        # One code per customer: the new one replaces the old, whose wrong tries go with it.
        await tx.set_verification_code(holder.customer_id, codes.verification(holder.customer_id, code),
                                       datetime.now(UTC) + CODE_TTL)
        event = events_pb2.VerificationCodeResent(
            event_id=new_id(), customer_id=str(holder.customer_id), email=holder.email,
            full_name=holder.full_name, verification_code=code, create_time=_timestamp(datetime.now(UTC)))
        await tx.append_event(events.OutboxEvent(events.CUSTOMER_TOPIC, str(holder.customer_id), event))


@_answered_alike
async def request_password_reset(customers: Customers, codes: Codes, throttle: Throttle, email: str,
                                 client_address: str) -> None:
    await throttle.count_request([ratelimit.Count(throttle.reset_by_email, email),
                                  *throttle.by_address(throttle.reset_by_address, client_address)])
    code = _new_code()
    async with customers.transaction() as tx:
        target = await tx.reset_target(email)
        # The same row for an unknown address, with a code nobody is sent: the same work, and
        # ResetPassword answers both alike (wrong tries counted, TOO_MANY_ATTEMPTS after 5).
        stored_code = code if target is not None else secrets.token_hex(16)
        await tx.set_password_reset(email, target[0] if target else None, codes.password_reset(email, stored_code),
                                    datetime.now(UTC) + CODE_TTL)
        if target is not None:
            event = events_pb2.PasswordResetRequested(event_id=new_id(), customer_id=str(target[0]), email=email,
                                                      reset_code=code, create_time=_timestamp(datetime.now(UTC)))
            await tx.append_event(events.OutboxEvent(events.CUSTOMER_TOPIC, str(target[0]), event))


async def reset_password(customers: Customers, codes: Codes, passwords: Passwords, throttle: Throttle,
                         revocations: Revocations, email: str, code: str, new_password: str,
                         client_address: str) -> None:
    email = _normal_email(email)
    if not code.isdigit() or len(code) != CODE_DIGITS:
        raise _invalid("code", f"must be the {CODE_DIGITS}-digit code from the email", "INVALID_CODE")
    # Every rule but the username's: that one only once the code proved who is asking.
    passwords.check(None, new_password, "new_password")
    code_hash = codes.password_reset(email, code)
    by_address = throttle.by_address(throttle.verify_by_address, client_address)
    async with codes.checks:
        attempt = await throttle.reserve(by_address)
        wrong = False
        try:
            async with customers.transaction() as tx:
                row = await tx.lock_password_reset(email)
                target = await tx.reset_target(email)
                if row is not None and row.failed_attempts >= CODE_ATTEMPTS_MAX:
                    raise _too_many_attempts("ask for a new one (POST /v1/credentials:requestPasswordReset)")
                wrong = row is None or not hmac.compare_digest(row.code_hash, code_hash)
                if row is not None and wrong:
                    await tx.count_failed_reset(email)  # committed: raised after the block
        finally:
            await throttle.limiter.settle(by_address, attempt, failed=wrong)
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
    passwords.check(username, new_password, "new_password")
    async with passwords.slots:
        password_hash = await passwords.hash(new_password)
    async with customers.transaction() as tx:
        # Spent here, in one transaction with its effect: two racing resets cannot both win.
        again = await tx.lock_password_reset(email)
        if again is None or again.code_hash != code_hash:
            raise _invalid("code", "is not the code we sent", "INVALID_CODE")
        await tx.use_password_reset(email)
        await tx.set_password(customer_id, password_hash)
        revoked = await tx.revoke_customer_sessions(customer_id, "password reset")
        await _password_changed(tx, customer_id, email, events_pb2.PasswordChanged.RESET)
    await _revoke_now(revocations, revoked)
    # The reset lifts the username's failed-login limits (from anywhere, and from here): the
    # lever of locking an owner out by guessing wrong is gone (docs/decisions/0016).
    await throttle.limiter.clear(throttle.login_counts(username, client_address)[:2])


async def change_password(customers: Customers, passwords: Passwords, throttle: Throttle, revocations: Revocations,
                          caller: auth.Caller, current_password: str, new_password: str, client_address: str) -> None:
    if caller.role is not auth.Role.CUSTOMER or caller.customer_id is None:
        raise refused("CUSTOMER_ONLY", "only customers change passwords here")
    customer_id = UUID(caller.customer_id)
    async with customers.connection() as tx:
        credential = await tx.get_customer_credential(customer_id)
    if credential is None:
        raise _bad_credentials()
    passwords.check(credential.username, new_password, "new_password")
    counts = throttle.login_counts(credential.username, client_address)
    _, ok = await _check_password_of(customers, passwords, throttle, credential.username, current_password, counts)
    if not ok:
        raise _bad_credentials()
    async with passwords.slots:
        password_hash = await passwords.hash(new_password)
    keep = parse_uuid(caller.session_id or "")
    async with customers.transaction() as tx:
        customer = await tx.get_customer(customer_id)
        assert customer is not None
        await tx.set_password(customer_id, password_hash)
        revoked = await tx.revoke_customer_sessions(customer_id, "password change", keep=keep)
        assert keep is None or keep not in revoked, "a password change ended the session that made it"
        await _password_changed(tx, customer_id, customer.email, events_pb2.PasswordChanged.CHANGE)
    await _revoke_now(revocations, revoked)


async def _password_changed(tx: Tx, customer_id: UUID, email: str,
                            method: events_pb2.PasswordChanged.Method.ValueType) -> None:
    event = events_pb2.PasswordChanged(event_id=new_id(), customer_id=str(customer_id), email=email, method=method,
                                       create_time=_timestamp(datetime.now(UTC)))
    await tx.append_event(events.OutboxEvent(events.CUSTOMER_TOPIC, str(customer_id), event))


async def _revoke_now(revocations: Revocations, session_ids: list[UUID]) -> None:
    """After commit: every token of these sessions is refused by every service from here on."""
    # A few at a time: the Redis pool is bounded and shared with every other request (all
    # at once, a customer with hundreds of sessions emptied it: MaxConnectionsError).
    for start in range(0, len(session_ids), REVOCATIONS_AT_ONCE_MAX):
        await asyncio.gather(*(revocations.revoke(str(sid))
                               for sid in session_ids[start:start + REVOCATIONS_AT_ONCE_MAX]))


def _own(caller: auth.Caller, customer_id: str) -> UUID:
    """The caller's own customer id, named in the request; anyone else's (a teller's too: they
    never act for a customer) is not found."""
    cid = parse_uuid(customer_id)
    if cid is None or caller.customer_id != str(cid):
        raise _not_found()
    return cid


async def update_customer(customers: Customers, caller: auth.Caller, customer_id: str, paths: list[str],
                          full_name: str, phone_number: str) -> store.Customer:
    cid = _own(caller, customer_id)
    if not paths:
        raise _invalid("update_mask", f"must name the fields to change: {', '.join(sorted(MUTABLE_FIELDS))}")
    immutable = sorted(set(paths) - MUTABLE_FIELDS)
    if immutable:
        raise _invalid("update_mask", f"cannot change {', '.join(immutable)}; only "
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
    async with customers.transaction() as tx:
        customer = await tx.update_profile(cid, changes)
    if customer is None:
        raise _not_found()
    return customer


async def change_email(customers: Customers, codes: Codes, throttle: Throttle, caller: auth.Caller,
                       customer_id: str, new_email: str) -> store.Customer:
    cid = _own(caller, customer_id)
    new_email = _normal_email(new_email)
    async with customers.connection() as tx:
        customer = await tx.get_customer(cid)
    if customer is None:
        raise _not_found()
    if new_email == customer.email:
        raise _invalid("new_email", "is already the customer's email")
    await throttle.count_request([ratelimit.Count(throttle.email_change_by_customer, str(cid))])
    code = _new_code()
    async with customers.transaction() as tx:
        holder = await tx.get_customer_by_email(new_email)
        if holder is not None and holder.email_verified:
            raise _email_taken()
        await tx.set_email_change(cid, new_email, codes.email_change(cid, code), datetime.now(UTC) + CODE_TTL)
        event = events_pb2.EmailChangeRequested(event_id=new_id(), customer_id=str(cid), new_email=new_email,
                                                verification_code=code, create_time=_timestamp(datetime.now(UTC)))
        await tx.append_event(events.OutboxEvent(events.CUSTOMER_TOPIC, str(cid), event))
    return customer


async def confirm_email_change(customers: Customers, codes: Codes, throttle: Throttle, caller: auth.Caller,
                               customer_id: str, code: str, client_address: str) -> store.Customer:
    cid = _own(caller, customer_id)
    if not code.isdigit() or len(code) != CODE_DIGITS:
        raise _invalid("code", f"must be the {CODE_DIGITS}-digit code from the email", "INVALID_CODE")
    by_address = throttle.by_address(throttle.verify_by_address, client_address)
    async with codes.checks:
        attempt = await throttle.reserve(by_address)
        wrong = False
        try:
            customer = await _confirm_email_change(customers, codes, cid, code)
        except DomainError as exc:
            wrong = exc.reason == "INVALID_CODE"
            raise
        finally:
            await throttle.limiter.settle(by_address, attempt, failed=wrong)
    return customer


async def _confirm_email_change(customers: Customers, codes: Codes, cid: UUID, code: str) -> store.Customer:
    failure: DomainError | None = None
    async with customers.transaction() as tx:
        pending = await tx.lock_email_change(cid)
        if pending is None:
            raise refused("NO_EMAIL_CHANGE", "no change of email is pending; ask for one first")
        if pending.failed_attempts >= CODE_ATTEMPTS_MAX:
            raise _too_many_attempts("ask for a new one (POST /v1/customers/{customer_id}:changeEmail)")
        if pending.expire_time <= datetime.now(UTC):
            raise refused("CODE_EXPIRED", "the code has expired")
        if not hmac.compare_digest(pending.code_hash, codes.email_change(cid, code)):
            await tx.count_failed_email_change(cid)  # committed: raised after the block
            failure = _invalid("code", "is not the code we sent", "INVALID_CODE")
        else:
            old = await tx.get_customer(cid)
            assert old is not None
            holder = await tx.lock_registration(pending.new_email)
            if holder is not None and holder.email_verified:
                raise _email_taken()
            if holder is not None:  # an unverified registration of the address: not taken
                await tx.delete_unverified_customer(holder.customer_id)
            customer = await tx.apply_email_change(cid, pending.new_email)
            assert customer.email == pending.new_email, f"customer {cid} kept {customer.email}"
            event = events_pb2.EmailChanged(event_id=new_id(), customer_id=str(cid), old_email=old.email,
                                            new_email=customer.email, create_time=_timestamp(datetime.now(UTC)))
            await tx.append_event(events.OutboxEvent(events.CUSTOMER_TOPIC, str(cid), event))
    if failure is not None:
        raise failure
    return customer


async def sweep(customers: Customers) -> tuple[int, int]:
    """Removes unverified registrations older than UNVERIFIED_TTL and stale password reset
    rows, a bounded batch of each; how many of each went."""
    now = datetime.now(UTC)
    async with customers.transaction() as tx:
        registrations = await tx.delete_stale_registrations(now - UNVERIFIED_TTL, SWEEP_BATCH_MAX)
        resets = await tx.delete_stale_password_resets(now - PASSWORD_RESET_ROW_TTL, SWEEP_BATCH_MAX)
    return registrations, resets


async def customer_profile(customers: Customers, customer_id: str) -> store.Customer:
    cid = parse_uuid(customer_id)
    async with customers.connection() as tx:
        customer = await tx.get_customer(cid) if cid else None
    if customer is None:
        raise _not_found()
    return customer

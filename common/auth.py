"""Authentication and authorization shared by every service.

- Access tokens are PASETO v4.public, signed with Ed25519 by svc_customer. The footer carries
  the key id (`kid`, the PASERK id of the public key), so keys rotate: every service verifies
  with any key in the verification set and svc_customer signs with one of them.
- A revoked session's tokens stop working at once: revocations are kept in Redis (one key per
  session, living as long as an access token can), checked on every authenticated RPC; no
  database query per request.
- Each RPC has an access level (Access); the interceptor enforces it before the handler runs
  and makes the caller available through `current()`.
- Internal RPCs (service to service) need the shared service token in metadata.

Keys live in a folder (BANK_TOKEN_KEY_DIR, layout under "keys" below): the one
`<name>.private.pem` signs, every `*.public.pem` verifies; `python -m common.auth rotate|retire|keys`
manages it and every process follows its changes. For the local stack the folder is created
with one key pair (named BANK_TOKEN_SIGNING_KEY) and a service token on first use.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import fcntl
import hmac
import itertools
import json
import logging
import os
import re
import secrets
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

import pyseto
import redis.asyncio as redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pyseto import Key
from pyseto.key_interface import KeyInterface

from common import redisdb
from common.config import Settings
from common.config import load as load_settings
from common.errors import DomainError, refused
from common.logging import fields

log = logging.getLogger("auth")

AUTHORIZATION_HEADER = "authorization"
SERVICE_TOKEN_HEADER = "x-bank-service-token"
SERVICE_NAME_HEADER = "x-bank-service"
REVOKED_KEY = "bank:revoked-session:{}"
TOKEN_LENGTH_MAX = 4096


class Role(StrEnum):
    CUSTOMER = "customer"
    TELLER = "teller"
    SERVICE = "service"


class Access(Enum):
    PUBLIC = "public"  # no token needed (registration, login)
    AUTHENTICATED = "authenticated"  # a customer or a teller
    TELLER = "teller"  # tellers only
    INTERNAL = "internal"  # other services only (service token)


@dataclass(frozen=True)
class Caller:
    subject: str  # customer id for customers, credential id for tellers, service name for services
    role: Role
    session_id: str | None = None

    @property
    def customer_id(self) -> str | None:
        return self.subject if self.role is Role.CUSTOMER else None

    @property
    def is_teller(self) -> bool:
        return self.role is Role.TELLER


_caller: ContextVar[Caller | None] = ContextVar("caller", default=None)


def current() -> Caller:
    """The authenticated caller of the RPC being handled."""
    caller = _caller.get()
    if caller is None:  # a handler of a PUBLIC RPC asked for a caller: a programming error
        raise RuntimeError("no authenticated caller in this context")
    return caller


def set_current(caller: Caller | None) -> Any:
    return _caller.set(caller)


def reset_current(token: Any) -> None:
    _caller.reset(token)


def unauthenticated(reason: str, message: str) -> DomainError:
    return refused(reason, message)


# --- keys ---------------------------------------------------------------------------------
#
# The key folder (BANK_TOKEN_KEY_DIR):
#   <name>.public.pem   a verification key: every one in the folder verifies
#   <name>.private.pem  the signing key: exactly one in the folder (its public key beside it)
#   service.token       the shared secret of internal RPCs
# `python -m common.auth rotate` adds a pair and makes it the one private key; the previous
# public key stays, so the tokens it signed keep verifying until it is retired
# (`python -m common.auth retire <name>`, or the next rotate once no token it signed can still
# be alive). Every process re-reads the folder when it changes (KeyWatch), without a restart.

PUBLIC_SUFFIX = ".public.pem"
PRIVATE_SUFFIX = ".private.pem"
KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# Clocks of the machines that sign and verify may differ by this much.
CLOCK_SKEW_S = 60
# A folder read while a rotation is half done (two private keys for a moment) is read again.
LOAD_TRIES = 5
LOAD_RETRY_S = 0.1


class KeyFolderError(Exception):
    """The key folder does not hold what it must (operator error, or a rotation half done)."""


@dataclass(frozen=True)
class KeyRing:
    signing_key: KeyInterface | None  # only svc_customer needs it; others verify only
    signing_kid: str  # "" when the ring cannot sign
    verify_keys: Mapping[str, KeyInterface]  # kid -> public key
    service_token: str
    folder: Path | None = None  # where the ring was read; None: a fixed ring (tests)


def _write_once(path: Path, data: bytes) -> None:
    """Create path with data unless it exists; safe when several processes race."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o600)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def _new_key_pair(folder: Path, name: str) -> None:
    """A fresh Ed25519 pair. The public key is derived from the private file that won, so two
    processes creating the same first key at once still end with a matching pair."""
    private_path = folder / f"{name}{PRIVATE_SUFFIX}"
    _write_once(private_path, Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    private = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
    assert isinstance(private, Ed25519PrivateKey)
    _write_once(folder / f"{name}{PUBLIC_SUFFIX}", private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def _names(folder: Path, suffix: str) -> list[str]:
    return sorted(path.name.removesuffix(suffix) for path in folder.glob(f"*{suffix}"))


def signing_key_name(folder: Path) -> str:
    """The name of the folder's one private key."""
    names = _names(folder, PRIVATE_SUFFIX)
    if len(names) != 1:
        raise KeyFolderError(f"{folder} must hold exactly one *{PRIVATE_SUFFIX} (the signing key); it holds "
                             f"{len(names)}")
    return names[0]


def ensure_local_keys(settings: Settings) -> None:
    """The local stack's first key pair (named BANK_TOKEN_SIGNING_KEY) and service token,
    created on first use."""
    folder = Path(settings.key_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if not _names(folder, PRIVATE_SUFFIX):
        _new_key_pair(folder, settings.token_signing_key)
    token_path = folder / "service.token"
    if not token_path.exists():
        _write_once(token_path, secrets.token_urlsafe(32).encode())


def _read_ring(folder: Path, signing: bool, service_token: str) -> KeyRing:
    verify: dict[str, KeyInterface] = {}
    for name in _names(folder, PUBLIC_SUFFIX):
        key = Key.new(version=4, purpose="public", key=(folder / f"{name}{PUBLIC_SUFFIX}").read_bytes())
        verify[key.to_paserk_id()] = key
    if not verify:
        raise KeyFolderError(f"no *{PUBLIC_SUFFIX} verification keys in {folder}")
    signing_key, signing_kid = None, ""
    if signing:
        name = signing_key_name(folder)
        signing_key = Key.new(version=4, purpose="public", key=(folder / f"{name}{PRIVATE_SUFFIX}").read_bytes())
        signing_kid = Key.new(version=4, purpose="public",
                              key=(folder / f"{name}{PUBLIC_SUFFIX}").read_bytes()).to_paserk_id()
        assert signing_kid in verify
    return KeyRing(signing_key, signing_kid, verify, service_token, folder)


def load_keys(settings: Settings, signing: bool) -> KeyRing:
    if settings.token_generate_local_keys:
        ensure_local_keys(settings)
    folder = Path(settings.key_dir)
    service_token = settings.service_token or (folder / "service.token").read_text().strip()
    for attempt in range(1, LOAD_TRIES + 1):
        try:
            return _read_ring(folder, signing, service_token)
        except (KeyFolderError, FileNotFoundError):
            if attempt == LOAD_TRIES:
                raise
            time.sleep(LOAD_RETRY_S)  # at start only: nothing else runs yet
    raise AssertionError("unreachable")


def _folder_stamp(folder: Path) -> int | None:
    """Changes whenever a file is added, removed or renamed in the folder (its mtime)."""
    try:
        return folder.stat().st_mtime_ns
    except OSError:
        return None


class KeyWatch:
    """A key ring that follows its folder: the folder's mtime is looked at (one stat, a few
    microseconds) at most every RECHECK_S, or sooner when a token names a key the ring lacks,
    and the folder is read again only when it changed. A folder caught mid-rotation keeps the
    previous ring until the next look."""

    RECHECK_S = 1.0
    FORCED_RECHECK_S = 0.1  # unknown key ids are the caller's choice: bounded re-reads

    def __init__(self, ring: KeyRing) -> None:
        self._ring = ring
        self._stamp = _folder_stamp(ring.folder) if ring.folder is not None else None
        self._checked_at = time.monotonic()

    def ring(self, recheck_now: bool = False) -> KeyRing:
        folder = self._ring.folder
        now = time.monotonic()
        since = now - self._checked_at
        if folder is None or since < (self.FORCED_RECHECK_S if recheck_now else self.RECHECK_S):
            return self._ring
        self._checked_at = now
        stamp = _folder_stamp(folder)
        if stamp == self._stamp:
            return self._ring
        try:
            self._ring = _read_ring(folder, self._ring.signing_key is not None, self._ring.service_token)
            self._stamp = stamp
            log.info("token keys reloaded", extra=fields(kids=sorted(self._ring.verify_keys),
                                                         signing_kid=self._ring.signing_kid or None))
        except (KeyFolderError, OSError, ValueError) as exc:
            log.warning("token key folder unreadable; keeping the previous keys", extra=fields(error=str(exc)))
        return self._ring


# --- tokens -------------------------------------------------------------------------------

@dataclass(frozen=True)
class AccessToken:
    token: str
    expire_time: datetime


class TokenIssuer:
    """Signs with the key folder's current signing key (a rotation is followed within a second)."""

    def __init__(self, keys: KeyRing, ttl_s: int) -> None:
        if keys.signing_key is None:
            raise ValueError("a TokenIssuer needs the signing key")
        self._keys = KeyWatch(keys)
        self._ttl_s = ttl_s

    def issue(self, subject: str, role: Role, session_id: str) -> AccessToken:
        ring = self._keys.ring()
        assert ring.signing_key is not None
        now = int(time.time())
        expire = datetime.fromtimestamp(now + self._ttl_s, UTC)
        claims = {"sub": subject, "role": role.value, "sid": session_id, "jti": uuid.uuid4().hex,
                  "iat": datetime.fromtimestamp(now, UTC).isoformat()}
        token = pyseto.encode(ring.signing_key, claims, footer={"kid": ring.signing_kid}, serializer=json,
                              exp=self._ttl_s)
        return AccessToken(token.decode(), expire)


class TokenVerifier:
    """Checks signature and expiry with the key folder's current verification keys. A verified
    token is remembered until it expires (a bounded cache), which saves the Ed25519 verification
    (~0.1 ms) on every later request with it, as long as its key is not retired; revocation is
    not cached: the interceptor asks Redis every time."""

    CACHE_ENTRIES_MAX = 10_000

    def __init__(self, keys: KeyRing) -> None:
        self._keys = KeyWatch(keys)
        self._verified: dict[str, tuple[Caller, float, str]] = {}

    def verify(self, token: str) -> Caller:
        cached = self._verified.get(token)
        if cached is not None:
            caller, expires_at, kid = cached
            if kid not in self._keys.ring().verify_keys:  # its key was retired since
                del self._verified[token]
                raise unauthenticated("INVALID_TOKEN", "the access token is not valid")
            if time.time() < expires_at:
                return caller
            del self._verified[token]
            raise unauthenticated("TOKEN_EXPIRED", "the access token has expired")
        caller, expires_at, kid = self._verify(token)
        if len(self._verified) >= self.CACHE_ENTRIES_MAX:
            self._verified.clear()  # crude but bounded; a full cache only costs re-verification
        self._verified[token] = (caller, expires_at, kid)
        return caller

    def _verify(self, token: str) -> tuple[Caller, float, str]:
        if len(token) > TOKEN_LENGTH_MAX or not token.startswith("v4.public."):
            raise unauthenticated("INVALID_TOKEN", "the access token is not valid")
        kid = _kid_of(token) or ""
        # A key id not in the ring may be a key added a moment ago: look at the folder again.
        key = self._keys.ring().verify_keys.get(kid)
        if key is None:
            key = self._keys.ring(recheck_now=True).verify_keys.get(kid)
        if key is None:
            raise unauthenticated("INVALID_TOKEN", "the access token is not valid")
        try:
            decoded = pyseto.decode(key, token, deserializer=json)
        except pyseto.VerifyError as exc:
            if "expired" in str(exc).lower():
                raise unauthenticated("TOKEN_EXPIRED", "the access token has expired") from exc
            raise unauthenticated("INVALID_TOKEN", "the access token is not valid") from exc
        except (pyseto.PysetoError, ValueError) as exc:
            raise unauthenticated("INVALID_TOKEN", "the access token is not valid") from exc
        claims = decoded.payload
        if not isinstance(claims, dict):
            raise unauthenticated("INVALID_TOKEN", "the access token is not valid")
        try:
            role = Role(claims["role"])
            subject, session_id = str(claims["sub"]), str(claims["sid"])
            expires_at = datetime.fromisoformat(str(claims["exp"])).timestamp()
        except (KeyError, ValueError) as exc:
            raise unauthenticated("INVALID_TOKEN", "the access token is not valid") from exc
        if role is Role.SERVICE:  # services authenticate with the service token, never a bearer token
            raise unauthenticated("INVALID_TOKEN", "the access token is not valid")
        return Caller(subject, role, session_id), expires_at, kid


def _kid_of(token: str) -> str | None:
    parts = token.split(".")
    if len(parts) != 4:
        return None
    try:
        footer = json.loads(base64.urlsafe_b64decode(parts[3] + "=" * (-len(parts[3]) % 4)))
    except ValueError:
        return None
    kid = footer.get("kid") if isinstance(footer, dict) else None
    return kid if isinstance(kid, str) else None


# --- revocation ---------------------------------------------------------------------------

class Revocations:
    """Revoked sessions, in Redis, each kept as long as an access token of it can live.

    The check runs on every authenticated RPC, so concurrent checks share Redis round trips:
    the sessions asked about while one MGET is out go together in the next (a session asked
    about twice in that time once). A check is always sent after its request arrived, never
    answered by one already under way, so a revocation that completed before a request
    started is always seen."""

    CHECK_BATCH_MAX = 512  # sessions per MGET; the rest go in the next one

    def __init__(self, client: redis.Redis, access_ttl_s: int) -> None:
        self._redis = client
        self._ttl_s = access_ttl_s
        # Sessions waiting for the next MGET; each future gives revoked or not, None when Redis failed.
        self._waiting: dict[str, asyncio.Future[bool | None]] = {}
        self._checker: asyncio.Task[None] | None = None

    async def revoke(self, session_id: str) -> None:
        await self._redis.set(REVOKED_KEY.format(session_id), b"1", ex=self._ttl_s + 60)

    async def is_revoked(self, session_id: str) -> bool:
        future = self._waiting.get(session_id)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._waiting[session_id] = future
            if self._checker is None or self._checker.done():
                self._checker = asyncio.create_task(self._check_waiting(), name="revocation-checks")
        # Shielded: a cancelled caller must not cancel the answer for the others waiting on it.
        revoked = await asyncio.shield(future)
        if revoked is None:
            # Fail closed: without the revocation list a revoked token could pass.
            raise refused("AUTH_UNAVAILABLE", "cannot check the session now; retry")
        return revoked

    async def _check_waiting(self) -> None:
        """One MGET at a time, for whatever waits, until nothing does."""
        while self._waiting:
            batch = dict(itertools.islice(self._waiting.items(), self.CHECK_BATCH_MAX))
            for session_id in batch:
                del self._waiting[session_id]
            answers: list[bool | None]
            try:
                values = await self._redis.mget([REVOKED_KEY.format(session_id) for session_id in batch])
                answers = [value is not None for value in values]
            except Exception as exc:  # any failure fails closed, and every waiter must get an answer
                log.warning("revocation check failed", exc_info=exc)
                answers = [None] * len(batch)
            for future, answer in zip(batch.values(), answers, strict=True):
                if not future.done():
                    future.set_result(answer)


redis_client = redisdb.client  # the name tests and tools use


# --- the check the interceptor runs -------------------------------------------------------

ALWAYS_PUBLIC = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class Authenticator:
    def __init__(self, verifier: TokenVerifier, revocations: Revocations, service_token: str,
                 access: Mapping[str, Access]) -> None:
        self._verifier = verifier
        self._revocations = revocations
        self._service_token = service_token.encode()
        self._access = dict(access)

    def access_of(self, method: str) -> Access:
        """A method's level: listed by full name, or by its service ("/pkg.Service/")."""
        if method.startswith(ALWAYS_PUBLIC):
            return Access.PUBLIC
        if method in self._access:
            return self._access[method]
        service_prefix = method[: method.rindex("/") + 1]
        return self._access.get(service_prefix, Access.AUTHENTICATED)

    async def authenticate(self, method: str, metadata: Sequence[tuple[str, str | bytes]]) -> Caller | None:
        level = self.access_of(method)
        if level is Access.PUBLIC:
            return None
        headers = {key: value for key, value in metadata if isinstance(value, str)}
        if level is Access.INTERNAL:
            presented = headers.get(SERVICE_TOKEN_HEADER, "").encode()
            if not presented or not hmac.compare_digest(presented, self._service_token):
                raise refused("SERVICE_ONLY", "this RPC is for the bank's services only")
            return Caller(headers.get(SERVICE_NAME_HEADER, "unknown-service")[:64], Role.SERVICE)
        authorization = headers.get(AUTHORIZATION_HEADER, "")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise unauthenticated("UNAUTHENTICATED", "an access token is required (Authorization: Bearer ...)")
        caller = self._verifier.verify(token.strip())
        assert caller.session_id is not None
        if await self._revocations.is_revoked(caller.session_id):
            raise unauthenticated("SESSION_REVOKED", "the session has been revoked")
        if level is Access.TELLER and caller.role is not Role.TELLER:
            raise refused("TELLER_ONLY", "this RPC is for tellers only")
        return caller


def service_metadata(keys: KeyRing, service: str) -> list[tuple[str, str]]:
    """Metadata a service sends on internal RPCs."""
    return [(SERVICE_TOKEN_HEADER, keys.service_token), (SERVICE_NAME_HEADER, service)]


# --- for tests and tools ------------------------------------------------------------------

class TestTokens:
    """Mints real tokens with the local keys (tests, benchmarks). Never used by a service."""

    def __init__(self, settings: Settings) -> None:
        self._keys = load_keys(settings, signing=True)
        self._issuer = TokenIssuer(self._keys, settings.access_token_ttl_s)

    def customer(self, customer_id: str, session_id: str | None = None) -> str:
        return self._issuer.issue(customer_id, Role.CUSTOMER, session_id or str(uuid.uuid4())).token

    def teller(self, subject: str = "test-teller", session_id: str | None = None) -> str:
        return self._issuer.issue(subject, Role.TELLER, session_id or str(uuid.uuid4())).token

    def service_metadata(self, service: str = "tests") -> list[tuple[str, str]]:
        return service_metadata(self._keys, service)


def test_tokens(settings: Settings) -> TestTokens:
    return TestTokens(settings)


# pytest must not collect these as tests.
TestTokens.__test__ = False  # type: ignore[attr-defined]
test_tokens.__test__ = False  # type: ignore[attr-defined]


# --- key rotation, by an operator: python -m common.auth keys|rotate|retire -----------------

@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """One rotation or retirement at a time per folder."""
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _signing_since(folder: Path, name: str) -> float:
    """When the key began to sign: its private key file was written then (by rotate)."""
    return (folder / f"{name}{PRIVATE_SUFFIX}").stat().st_mtime


@dataclass(frozen=True)
class Rotation:
    new_name: str
    previous_name: str
    retired: list[str]


def rotate(settings: Settings) -> Rotation:
    """A new key pair becomes the signing key. The previous public key stays (its tokens keep
    verifying); keys that stopped signing before the previous one began are retired if that
    was longer ago than an access token lives: no token they signed can be alive."""
    folder = Path(settings.key_dir)
    with _folder_lock(folder):
        previous = signing_key_name(folder)
        previous_since = _signing_since(folder, previous)
        name = f"key-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"
        _new_key_pair(folder, name)
        # Two private keys for a moment (readers keep their previous ring meanwhile), never none.
        (folder / f"{previous}{PRIVATE_SUFFIX}").unlink()
        retired: list[str] = []
        if time.time() - previous_since > settings.access_token_ttl_s + CLOCK_SKEW_S:
            for old in _names(folder, PUBLIC_SUFFIX):
                if old not in (previous, name):
                    (folder / f"{old}{PUBLIC_SUFFIX}").unlink()
                    retired.append(old)
    return Rotation(name, previous, retired)


def retire(settings: Settings, name: str, now: bool = False) -> None:
    """Drop a verification key: the tokens it signed stop working within a second everywhere.
    Refused for the signing key, and, unless now, while a token it signed may still be alive."""
    folder = Path(settings.key_dir)
    if not KEY_NAME.match(name):
        raise KeyFolderError(f"{name!r} is not a key name")
    with _folder_lock(folder):
        signing = signing_key_name(folder)
        if name == signing:
            raise KeyFolderError(f"{name} is the signing key: rotate first")
        public = folder / f"{name}{PUBLIC_SUFFIX}"
        if not public.exists():
            raise KeyFolderError(f"no key {name} in {folder}")
        safe_at = _signing_since(folder, signing) + settings.access_token_ttl_s + CLOCK_SKEW_S
        if not now and time.time() < safe_at:
            raise KeyFolderError(
                f"tokens signed by {name} may be alive until {time.strftime('%H:%M:%SZ', time.gmtime(safe_at))}; "
                "retire it then, or pass --now to cut them off at once (their sessions refresh)")
        public.unlink()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.auth", description="Manage the access-token keys.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("keys", help="list the keys: name, key id, which one signs")
    commands.add_parser("rotate", help="make a new signing key; the previous one keeps verifying")
    retiring = commands.add_parser("retire", help="drop a verification key (not the signing key)")
    retiring.add_argument("name")
    retiring.add_argument("--now", action="store_true", help="even if tokens it signed may still be alive")
    args = parser.parse_args(argv)
    settings = load_settings()
    try:
        if args.command == "rotate":
            done = rotate(settings)
            print(f"signing with {done.new_name}; {done.previous_name} still verifies"
                  + (f"; retired {', '.join(done.retired)}" if done.retired else ""))
        elif args.command == "retire":
            retire(settings, args.name, args.now)
            print(f"retired {args.name}")
        else:
            folder = Path(settings.key_dir)
            signing = signing_key_name(folder)
            for name in _names(folder, PUBLIC_SUFFIX):
                kid = Key.new(version=4, purpose="public", key=(folder / f"{name}{PUBLIC_SUFFIX}").read_bytes())
                print(f"{name}\t{kid.to_paserk_id()}\t{'signing' if name == signing else 'verifying'}")
    except KeyFolderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

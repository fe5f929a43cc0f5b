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

Keys live in a folder (BANK_TOKEN_KEY_DIR): `<name>.private.pem` / `<name>.public.pem`;
BANK_TOKEN_SIGNING_KEY names the signing key, every `*.public.pem` verifies. For the local
stack the folder is created with one key pair and a service token on first use.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

import grpc
import pyseto
import redis.asyncio as redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pyseto import Key
from pyseto.key_interface import KeyInterface

from common.config import Settings
from common.errors import DomainError

AUTHORIZATION_HEADER = "authorization"
SERVICE_TOKEN_HEADER = "x-bank-service-token"
SERVICE_NAME_HEADER = "x-bank-service"
REVOKED_KEY = "bank:revoked-session:{}"
MAX_TOKEN_LENGTH = 4096


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
    return DomainError(grpc.StatusCode.UNAUTHENTICATED, reason, message)


# --- keys ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class KeyRing:
    signing_key: KeyInterface | None  # only svc_customer needs it; others verify only
    signing_kid: str
    verify_keys: Mapping[str, KeyInterface]  # kid -> public key
    service_token: str


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


def ensure_local_keys(settings: Settings) -> None:
    """The local stack's key pair and service token, created on first use."""
    folder = Path(settings.key_dir)
    folder.mkdir(parents=True, exist_ok=True)
    private_path = folder / f"{settings.token_signing_key}.private.pem"
    if not private_path.exists():
        key = Ed25519PrivateKey.generate()
        _write_once(private_path, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    public_path = folder / f"{settings.token_signing_key}.public.pem"
    if not public_path.exists():
        private = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
        assert isinstance(private, Ed25519PrivateKey)
        _write_once(public_path, private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    token_path = folder / "service.token"
    if not token_path.exists():
        _write_once(token_path, secrets.token_urlsafe(32).encode())


def load_keys(settings: Settings, signing: bool) -> KeyRing:
    if settings.token_generate_local_keys:
        ensure_local_keys(settings)
    folder = Path(settings.key_dir)
    verify: dict[str, KeyInterface] = {}
    for path in sorted(folder.glob("*.public.pem")):
        key = Key.new(version=4, purpose="public", key=path.read_bytes())
        verify[key.to_paserk_id()] = key
    if not verify:
        raise RuntimeError(f"no *.public.pem verification keys in {folder}")
    signing_public = folder / f"{settings.token_signing_key}.public.pem"
    signing_kid = Key.new(version=4, purpose="public", key=signing_public.read_bytes()).to_paserk_id()
    signing_key = None
    if signing:
        signing_key = Key.new(version=4, purpose="public",
                              key=(folder / f"{settings.token_signing_key}.private.pem").read_bytes())
    service_token = settings.service_token or (folder / "service.token").read_text().strip()
    return KeyRing(signing_key, signing_kid, verify, service_token)


# --- tokens -------------------------------------------------------------------------------

@dataclass(frozen=True)
class AccessToken:
    token: str
    expire_time: datetime


class TokenIssuer:
    def __init__(self, keys: KeyRing, ttl_s: int) -> None:
        if keys.signing_key is None:
            raise ValueError("a TokenIssuer needs the signing key")
        self._key = keys.signing_key
        self._kid = keys.signing_kid
        self._ttl_s = ttl_s

    def issue(self, subject: str, role: Role, session_id: str) -> AccessToken:
        now = int(time.time())
        expire = datetime.fromtimestamp(now + self._ttl_s, UTC)
        claims = {"sub": subject, "role": role.value, "sid": session_id, "jti": uuid.uuid4().hex,
                  "iat": datetime.fromtimestamp(now, UTC).isoformat()}
        token = pyseto.encode(self._key, claims, footer={"kid": self._kid}, serializer=json, exp=self._ttl_s)
        return AccessToken(token.decode(), expire)


class TokenVerifier:
    """Checks signature and expiry. A verified token is remembered until it expires (a bounded
    cache), which saves the Ed25519 verification (~0.1 ms) on every later request with it;
    revocation is not cached: the interceptor asks Redis every time."""

    CACHE_ENTRIES_MAX = 10_000

    def __init__(self, keys: KeyRing) -> None:
        self._keys = keys.verify_keys
        self._verified: dict[str, tuple[Caller, float]] = {}

    def verify(self, token: str) -> Caller:
        cached = self._verified.get(token)
        if cached is not None:
            caller, expires_at = cached
            if time.time() < expires_at:
                return caller
            del self._verified[token]
            raise unauthenticated("TOKEN_EXPIRED", "the access token has expired")
        caller, expires_at = self._verify(token)
        if len(self._verified) >= self.CACHE_ENTRIES_MAX:
            self._verified.clear()  # crude but bounded; a full cache only costs re-verification
        self._verified[token] = (caller, expires_at)
        return caller

    def _verify(self, token: str) -> tuple[Caller, float]:
        if len(token) > MAX_TOKEN_LENGTH or not token.startswith("v4.public."):
            raise unauthenticated("INVALID_TOKEN", "the access token is not valid")
        key = self._keys.get(_kid_of(token) or "")
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
        return Caller(subject, role, session_id), expires_at


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
    """Revoked sessions, in Redis, each kept as long as an access token of it can live."""

    def __init__(self, client: redis.Redis, access_ttl_s: int) -> None:
        self._redis = client
        self._ttl_s = access_ttl_s

    async def revoke(self, session_id: str) -> None:
        await self._redis.set(REVOKED_KEY.format(session_id), b"1", ex=self._ttl_s + 60)

    async def is_revoked(self, session_id: str) -> bool:
        try:
            return bool(await self._redis.exists(REVOKED_KEY.format(session_id)))
        except (redis.RedisError, OSError) as exc:
            # Fail closed: without the revocation list a revoked token could pass.
            raise DomainError(grpc.StatusCode.UNAVAILABLE, "AUTH_UNAVAILABLE",
                              "cannot check the session now; retry") from exc


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis(host=settings.redis_host, port=settings.redis_port,
                       socket_timeout=1.0, socket_connect_timeout=1.0, max_connections=64)


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
                raise DomainError(grpc.StatusCode.PERMISSION_DENIED, "SERVICE_ONLY",
                                  "this RPC is for the bank's services only")
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
            raise DomainError(grpc.StatusCode.PERMISSION_DENIED, "TELLER_ONLY", "this RPC is for tellers only")
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

"""Access tokens: PASETO v4.public, signed with Ed25519 by svc_customer (TokenIssuer), verified
by every service (TokenVerifier); the footer's `kid` names the key, so keys rotate."""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import pyseto

from common.auth.caller import Caller, Role, unauthenticated
from common.auth.keys import KeyRing, KeyWatch

TOKEN_LENGTH_MAX = 4096


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

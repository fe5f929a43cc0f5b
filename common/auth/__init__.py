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

from common.auth.access import (
    ALWAYS_PUBLIC,
    AUTHORIZATION_HEADER,
    SERVICE_NAME_HEADER,
    SERVICE_TOKEN_HEADER,
    Authenticator,
    service_metadata,
)
from common.auth.caller import Access, Caller, Role, current, reset_current, set_current, unauthenticated
from common.auth.keys import (
    PRIVATE_SUFFIX,
    PUBLIC_SUFFIX,
    KeyFolderError,
    KeyRing,
    KeyWatch,
    Rotation,
    ensure_local_keys,
    load_keys,
    retire,
    rotate,
    signing_key_name,
)
from common.auth.revocations import REVOKED_KEY, Revocations, redis_client
from common.auth.tokens import TOKEN_LENGTH_MAX, AccessToken, TokenIssuer, TokenVerifier

__all__ = [
    "ALWAYS_PUBLIC", "AUTHORIZATION_HEADER", "PRIVATE_SUFFIX", "PUBLIC_SUFFIX", "REVOKED_KEY", "SERVICE_NAME_HEADER",
    "SERVICE_TOKEN_HEADER", "TOKEN_LENGTH_MAX", "Access", "AccessToken", "Authenticator", "Caller", "KeyFolderError",
    "KeyRing", "KeyWatch", "Revocations", "Role", "Rotation", "TokenIssuer", "TokenVerifier", "current",
    "ensure_local_keys", "load_keys", "redis_client", "reset_current", "retire", "rotate", "service_metadata",
    "set_current", "signing_key_name", "unauthenticated",
]

"""The check the interceptor runs before a handler: each RPC's access level, the bearer token or
the service token of internal RPCs, and the revocation list."""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence

from common.auth.caller import Access, Caller, Role, unauthenticated
from common.auth.keys import KeyRing
from common.auth.revocations import Revocations
from common.auth.tokens import TokenVerifier
from common.errors import refused

AUTHORIZATION_HEADER = "authorization"
SERVICE_TOKEN_HEADER = "x-bank-service-token"
SERVICE_NAME_HEADER = "x-bank-service"


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

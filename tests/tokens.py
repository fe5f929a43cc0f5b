"""Real access tokens for tests and benchmarks, minted with the local keys (the stack's key
folder). Test code only: no service imports it, and it is not in the service image's code."""

from __future__ import annotations

import uuid

from common.auth import Role, TokenIssuer, load_keys, service_metadata
from common.config import Settings


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

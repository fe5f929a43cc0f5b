"""List pagination (AIP-158): page_size default 50, max 500; opaque page tokens.

A token is base64url JSON of the last item's sort key, so a page is a keyset query (no
OFFSET): stable under inserts and O(page) whatever the depth."""

from __future__ import annotations

import base64
import json
from typing import Any

from common.errors import DomainError, refused

DEFAULT_PAGE_SIZE = 50
PAGE_SIZE_MAX = 500
TOKEN_LENGTH_MAX = 512


def page_size(requested: int) -> int:
    if requested < 0:
        raise refused("INVALID_PAGE_SIZE", "page_size must not be negative",
                      field_violations=[("page_size", "must be >= 0")])
    return DEFAULT_PAGE_SIZE if requested == 0 else min(requested, PAGE_SIZE_MAX)


def encode_token(key: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(key, separators=(",", ":")).encode()).decode().rstrip("=")


def invalid_token() -> DomainError:
    return refused("INVALID_PAGE_TOKEN", "page_token is not valid",
                   field_violations=[("page_token", "not a token this list returned")])


def decode_token(token: str, length: int) -> list[Any] | None:
    """The sort key in a page token (None for the first page); a malformed token is INVALID_ARGUMENT."""
    if not token:
        return None
    try:
        if len(token) > TOKEN_LENGTH_MAX:
            raise ValueError("too long")
        key = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if not isinstance(key, list) or len(key) != length:
            raise ValueError("shape")
        return key
    except ValueError as exc:
        raise invalid_token() from exc

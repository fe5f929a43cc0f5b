"""Identifiers: UUIDv7 (RFC 9562), time-ordered, so new rows land at the end of btree indexes
and ids sort by creation time. Python 3.11's uuid module has no uuid7 yet."""

from __future__ import annotations

import os
import time
import uuid

# A request id, both kinds: a transfer's idempotency key (AIP-155; API.md: 1-64 characters,
# also a rule in proto/) and the x-request-id of a call (a longer one is replaced by a new id).
# Envoy's ids are UUIDs (36 characters); one limit for both keeps log lines and keys bounded alike.
REQUEST_ID_LENGTH_MAX = 64


def uuid7() -> uuid.UUID:
    unix_ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (unix_ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a: 12 random bits
    value |= 0b10 << 62  # variant
    value |= rand & ((1 << 62) - 1)
    return uuid.UUID(int=value)


def new_id() -> str:
    return str(uuid7())


def parse_uuid(value: str) -> uuid.UUID | None:
    """The UUID in value, or None when it is not one (callers turn that into NOT_FOUND or INVALID_ARGUMENT)."""
    if len(value) > 64:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None

"""Sliding-window rate limits in Redis, and the client address they are keyed by.

A limit allows at most `max_events` events per subject (a username, a client address) in any
`window_s` seconds. Each (limit, subject) is one sorted set of event times; one Lua script trims
the events older than the window, counts, and (when recording) adds, atomically and in one round
trip, on Redis's own clock so every process of every service agrees. When a subject is full, the
script also says how long until the window admits again: the age-out time of the oldest event
that has to go, which becomes the google.rpc.RetryInfo of the refusal.

Redis down or slow (past CALL_TIMEOUT_S): the limits fail open (the request proceeds, a warning is
logged at most every LOG_EVERY_S, and rate_limit_checks_total{outcome="error"} counts it). Refusing every login while
a cache is down would turn a Redis outage into a bank outage; see
docs/decisions/0010-rate-limits-count-failures.md.

Keys hold a hash of the subject, never the username or address itself. All keys of one call must
live on one Redis (true of the bank's single Redis; a Redis Cluster would need hash tags).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import math
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis
from prometheus_client import Counter

from common import redisdb
from common.errors import DomainError, refused

log = logging.getLogger("ratelimit")

KEY_PREFIX = "ratelimit"
CLIENT_ADDRESS_HEADER = "x-bank-client-address"
LOG_EVERY_S = 10.0
# The script takes well under a millisecond; past this, Redis counts as down.
CALL_TIMEOUT_S = 0.25
# IPv6 clients usually hold a whole /64: keyed by single address, one client would have 2^64 budgets.
IPV6_PREFIX_LENGTH = 64

CHECKS = Counter("rate_limit_checks_total", "Rate limit checks, by limit and outcome (admitted, limited, error)",
                 ["limit", "outcome"])

# KEYS: one sorted set per (limit, subject). ARGV[1]: "check", "record" or "clear"; ARGV[2]: a
# unique event id; then per key its max_events and window in ms. Returns, per key, the ms until
# it admits again (0: admits now). "record" adds the event first, so its answer is about the
# next attempt.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mode = ARGV[1]
local waits = {}
for i, key in ipairs(KEYS) do
  local max_events = tonumber(ARGV[1 + 2 * i])
  local window_ms = tonumber(ARGV[2 + 2 * i])
  local wait_ms = 0
  if mode == 'clear' then
    redis.call('DEL', key)
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window_ms)
    if mode == 'record' then
      redis.call('ZADD', key, now, now .. ':' .. ARGV[2])
      redis.call('PEXPIRE', key, window_ms)
    end
    local count = redis.call('ZCARD', key)
    if count >= max_events then
      local oldest = redis.call('ZRANGE', key, count - max_events, count - max_events, 'WITHSCORES')
      wait_ms = math.max(1, tonumber(oldest[2]) + window_ms - now)
    end
  end
  waits[i] = wait_ms
end
return waits
"""


# Reservations (SlidingWindow.reserve): one attempt in progress holds a place in each window it
# counts against until it is settled, so attempts sent together cannot all pass one check.
# KEYS: the windows; ARGV[1]: "reserve" or "settle"; ARGV[2]: the attempt's id; ARGV[3]: for
# settle, "1" when the attempt failed (it stays counted) else "0"; then per key its max_events
# and window in ms. The places in progress of a window live in a second sorted set, "<key>:p",
# and lapse after RESERVATION_TTL_MS (a process that died mid-attempt frees its place). reserve
# returns, per key, 0 (reserved, in every key, or in none), -1 (full of attempts in progress:
# try again in a moment) or the ms until the window admits again (full of failures).
RESERVATION_TTL_MS = 30_000
_RESERVE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mode = ARGV[1]
local id = ARGV[2]
local ttl_ms = tonumber(ARGV[4])
local waits = {}
local admit = true
for i, key in ipairs(KEYS) do
  local max_events = tonumber(ARGV[3 + 2 * i])
  local window_ms = tonumber(ARGV[4 + 2 * i])
  local pending = key .. ':p'
  if mode == 'settle' then
    redis.call('ZREM', pending, id)
    if ARGV[3] == '1' then
      redis.call('ZADD', key, now, now .. ':' .. id)
      redis.call('PEXPIRE', key, window_ms)
    end
    waits[i] = 0
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window_ms)
    redis.call('ZREMRANGEBYSCORE', pending, '-inf', now - ttl_ms)
    local failures = redis.call('ZCARD', key)
    local wait_ms = 0
    if failures >= max_events then
      local oldest = redis.call('ZRANGE', key, failures - max_events, failures - max_events, 'WITHSCORES')
      wait_ms = math.max(1, tonumber(oldest[2]) + window_ms - now)
    elseif failures + redis.call('ZCARD', pending) >= max_events then
      wait_ms = -1
    end
    if wait_ms ~= 0 then admit = false end
    waits[i] = wait_ms
  end
end
if mode == 'reserve' and admit then
  for i, key in ipairs(KEYS) do
    redis.call('ZADD', key .. ':p', now, id)
    redis.call('PEXPIRE', key .. ':p', ttl_ms)
  end
end
return waits
"""
# How often, and for how long at most, an attempt waits for a place held by attempts in progress
# (each takes about one argon2id verification, tens of ms).
RESERVE_POLL_S = 0.02
RESERVE_WAIT_MAX_S = 5.0


@dataclass(frozen=True)
class Limit:
    name: str  # the metric label and part of the key, e.g. "login_failures_by_username"
    max_events: int  # 0 or less: no limit
    window_s: float

    @property
    def enabled(self) -> bool:
        return self.max_events > 0 and self.window_s > 0


@dataclass(frozen=True)
class Count:
    """One limit applied to one subject."""

    limit: Limit
    subject: str

    @property
    def key(self) -> str:
        digest = hashlib.sha256(self.subject.encode()).hexdigest()[:32]
        return f"{KEY_PREFIX}:{self.limit.name}:{digest}"


class SlidingWindow:
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._script = client.register_script(_SCRIPT)
        self._reserve_script = client.register_script(_RESERVE_SCRIPT)
        self._last_error_log = 0.0

    async def retry_after_s(self, counts: Sequence[Count]) -> float:
        """0 if every count admits another event now, else the seconds until all of them do."""
        counts = [c for c in counts if c.limit.enabled]
        waits = await self._run("check", counts)
        for count, wait_ms in zip(counts, waits, strict=True):
            CHECKS.labels(count.limit.name, "limited" if wait_ms > 0 else "admitted").inc()
        return max(waits, default=0) / 1000

    async def record(self, counts: Sequence[Count]) -> None:
        """Counts one event against each."""
        await self._run("record", counts)

    async def clear(self, counts: Sequence[Count]) -> None:
        """Forgets the events of each (a login that succeeded clears its username's failures)."""
        await self._run("clear", counts)

    async def reserve(self, counts: Sequence[Count]) -> tuple[str, float]:
        """Check and count in one step: holds a place for one attempt in every window, or in none.
        Returns (the attempt's id, 0) once reserved, or ("", seconds until the windows admit
        again) when a window is full of failures. While a window is full only because of
        attempts in progress, waits for them to settle (at most RESERVE_WAIT_MAX_S, then the
        answer is "retry in a second"). Settle every reservation with settle()."""
        counts = [c for c in counts if c.limit.enabled]
        attempt = secrets.token_hex(8)
        deadline = time.monotonic() + RESERVE_WAIT_MAX_S
        while True:  # bounded by the deadline: returns at the latest RESERVE_WAIT_MAX_S from now
            waits = await self._run("reserve", counts, script=self._reserve_script, attempt=attempt)
            limited = max(waits, default=0)
            for count, wait_ms in zip(counts, waits, strict=False):
                CHECKS.labels(count.limit.name, "limited" if wait_ms > 0 else "admitted").inc()
            if limited > 0:
                return "", limited / 1000
            if min(waits, default=0) == 0:
                return attempt, 0.0
            if time.monotonic() >= deadline:
                return "", 1.0
            await asyncio.sleep(RESERVE_POLL_S)

    async def settle(self, counts: Sequence[Count], attempt: str, *, failed: bool) -> None:
        """Ends a reservation: a failed attempt stays counted in every window, a successful one
        leaves none."""
        counts = [c for c in counts if c.limit.enabled]
        if attempt:
            await self._run("settle", counts, script=self._reserve_script, attempt=attempt, failed=failed)

    async def _run(self, mode: str, counts: Sequence[Count], script: Any = None, attempt: str = "",
                   failed: bool = False) -> list[int]:
        counts = [c for c in counts if c.limit.enabled]
        if not counts:
            return []
        args: list[str | int] = [mode, secrets.token_hex(8)]
        if script is not None:
            args = [mode, attempt, "1" if failed else "0", RESERVATION_TTL_MS]
        for count in counts:
            args += [count.limit.max_events, max(1, round(count.limit.window_s * 1000))]
        try:
            # Bounded: the client's own retries would hold a login for seconds while Redis is down.
            async with asyncio.timeout(CALL_TIMEOUT_S):
                waits = await (script or self._script)(keys=[c.key for c in counts], args=args)
        except redisdb.TRANSIENT_ERRORS as exc:
            # Fail open, loudly: see the module docstring.
            for count in counts:
                CHECKS.labels(count.limit.name, "error").inc()
            now = time.monotonic()
            if now - self._last_error_log >= LOG_EVERY_S:
                self._last_error_log = now
                log.warning("rate limits unavailable, not enforced: %s", exc)
            return [0] * len(counts)
        return [int(w) for w in waits]


def rate_limited(retry_after_s: float) -> DomainError:
    """The refusal: RESOURCE_EXHAUSTED (429 through Envoy), reason RATE_LIMITED, with RetryInfo."""
    return refused("RATE_LIMITED", f"too many failed attempts; retry in {math.ceil(retry_after_s)} s",
                   retry_after_s=retry_after_s)


# --- the client's address -------------------------------------------------------------------

def client_address(metadata: Iterable[tuple[str, str | bytes]], peer: str) -> str:
    """The address of the client, as Envoy saw it.

    Envoy writes the TCP peer it accepted into x-bank-client-address, over whatever the client
    sent (envoy/envoy.yaml.tmpl). x-forwarded-for is not used: its entries before the last are
    the client's own words, and for a peer of exactly 127.0.0.1 Envoy appends its host's
    address instead of the peer's. Services listen only where Envoy and the bank's own processes
    reach them, so a call without the header is one of those, and its gRPC peer is used.
    """
    for key, value in metadata:
        if key == CLIENT_ADDRESS_HEADER and isinstance(value, str):
            parsed = _ip(value.strip())
            if parsed is not None:
                return parsed
    # grpc peers look like "ipv4:127.0.0.1:50000" or "ipv6:[::1]:50000".
    host = peer.split(":", 1)[1] if ":" in peer else peer
    host = host.rsplit(":", 1)[0].strip("[]")
    return _ip(host) or host or "unknown"


def _ip(text: str) -> str | None:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:  # ::ffff:192.0.2.1 is 192.0.2.1
        return str(ip.ipv4_mapped)
    return str(ip)


def address_subject(address: str) -> str:
    """What an address is counted as: itself for IPv4, its /64 for IPv6."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/{IPV6_PREFIX_LENGTH}", strict=False))
    return str(ip)


def parse_networks(spec: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """A comma-separated list of addresses or CIDR networks, e.g. "127.0.0.1,::1,10.0.0.0/8"."""
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip())


def is_exempt(address: str, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)

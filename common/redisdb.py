"""Redis for a service (session revocations, rate limits): its client, bounded, and the errors
that mean Redis is unreachable or slow rather than that the bank is broken."""

from __future__ import annotations

import redis.asyncio as redis
from redis import exceptions

from common.config import Settings

# Redis is unreachable, restarting (BusyLoadingError is a ConnectionError) or slow. OSError:
# what the socket raises under the client (TimeoutError included). The one list for Redis.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (exceptions.ConnectionError, exceptions.TimeoutError, OSError)


def client(settings: Settings) -> redis.Redis:
    """The service's client: every call gives up after a second (timeouts passed here, not the
    library's defaults, which wait for ever), at most 64 connections."""
    return redis.Redis(host=settings.redis_host, port=settings.redis_port,
                       socket_timeout=1.0, socket_connect_timeout=1.0, max_connections=64)

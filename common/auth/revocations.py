"""Revoked sessions, in Redis: one key per session, living as long as an access token can; checked
on every authenticated RPC, no database query per request."""

from __future__ import annotations

import asyncio
import itertools
import logging

import redis.asyncio as redis

from common import redisdb
from common.errors import refused

log = logging.getLogger("auth")

REVOKED_KEY = "bank:revoked-session:{}"


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

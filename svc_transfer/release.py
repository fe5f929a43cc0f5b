"""The release worker: lapsed holds become EXPIRED and their money available again.

API.md: a lapsed hold is released exactly once, within seconds of its expire_time, even if every
service was down at that moment (then on the next start). The clock that decides is the
database's: at or after expire_time the ledger refuses a post or a void (HOLD_EXPIRED) whether
or not this worker has run, so a late release only keeps available_balance low for longer.

Each tick calls release_lapsed_holds (migrations/0006) until a batch comes back short: one
statement claims the oldest lapsed PENDING holds with FOR UPDATE SKIP LOCKED and settles them
through move_money_batch's EXPIRE kind, in one transaction. Every process runs one; SKIP LOCKED
lets them share the work and never wait for each other or for a user's post or void. It does
not go through the MovementBatcher queue: the claim must be in the releasing transaction, and
users must not queue behind a catch-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import Counter, Gauge
from psycopg_pool import AsyncConnectionPool

from common import logging as bank_logging
from common.outbox import OutboxNudge
from svc_transfer import store

log = logging.getLogger(__name__)

# A user batch's bound: the release holds its rows' locks as briefly as a batch of movements.
RELEASE_BATCH_SIZE = 64
# A catch-up after downtime: at most this many batches a tick (3,200 holds), then the gauge.
RELEASE_BATCHES_PER_TICK_MAX = 50
# How often lapsed holds are looked for: "within seconds of expire_time".
RELEASE_POLL_S = 1.0

RELEASE_LAG = Gauge("ledger_holds_release_lag_seconds",
                    "Age of the oldest lapsed hold still PENDING (0: none waits for release)")
RELEASED = Counter("ledger_holds_released_total", "Holds released by expiry")


class HoldReleaser:
    """A server.Worker: releases lapsed holds every RELEASE_POLL_S until stop()."""

    def __init__(self, pool: AsyncConnectionPool, nudge: OutboxNudge) -> None:
        self._pool = pool
        self._nudge = nudge
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="hold-releaser")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def release_once(self) -> int:
        """One tick: releases lapsed holds in batches until none is left or the tick's bound;
        returns how many it released."""
        released = 0
        for _ in range(RELEASE_BATCHES_PER_TICK_MAX):
            results = await store.release_lapsed_holds(self._pool, RELEASE_BATCH_SIZE)
            done = sum(1 for movement in results if movement.error is None)
            # HOLD_NOT_LAPSED: the clock went back between the claim and the decision; next tick.
            released += done
            if len(results) < RELEASE_BATCH_SIZE or done == 0:
                break
        if released:
            RELEASED.inc(released)
            self._nudge()  # HoldExpired events wait in the outbox
        return released

    async def _run(self) -> None:
        # Until stop(): lapsed holds can appear at any time while the service runs.
        while not self._stop.is_set():
            try:
                await self.release_once()
            except store.LedgerBusy as exc:  # lock timeout, Postgres restarting: the next tick retries
                log.warning("hold release deferred", extra=bank_logging.fields(error=str(exc)))
            except Exception:  # a bug must not stop the releases for good: logged, retried next tick
                log.exception("hold release failed")
            # Measured whether or not the release worked: a release failing every tick shows as a
            # growing lag, and HoldsReleaseLagging pages.
            try:
                RELEASE_LAG.set(await store.holds_release_lag_s(self._pool))
            except Exception as exc:  # Postgres unreachable: the gauge keeps its last value
                log.warning("hold release lag not measured", extra=bank_logging.fields(error=str(exc)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), RELEASE_POLL_S)

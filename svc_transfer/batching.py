"""Group commit for the ledger: the movements that arrive together go to Postgres as one batch.

Each movement request waits in a queue; a few batch loops take whatever is waiting (up to
BATCH_SIZE_MAX) and apply it with one call of move_money_batch (migrations/0005): one round
trip, one transaction, one WAL flush, and each account's lock taken once per batch instead of
once per movement. Nothing waits for a batch to fill: a loop that finds one movement sends one,
so a quiet ledger answers as fast as before, and a busy one sends bigger batches by itself
(while BATCHES_IN_FLIGHT_MAX batches run, the queue grows, and the next batch takes it all).

Every movement still gets its own result or refusal. An operating error of the batch (lock or
statement timeout, lost connection, no answer in time) fails every movement in it with
LedgerBusy: the outcome is unknown (a commit may have happened before the connection was lost),
and each caller may retry with its request_id, which moves money at most once.

A caller waits at most store.CALL_DEADLINE_S from its movement's arrival, in the queue and in
the call (below Envoy's route timeout: the client hears 503 LEDGER_BUSY, not a gateway's 504),
even when the call itself overruns (psycopg's cancel of a query may take seconds more). A batch
stuck on Postgres (a failover: no leader for seconds) makes the next one wait; a movement left
with less than CALL_MIN_S of its time is then refused LedgerBusy without being sent (nothing of
it moved), and a call gets no more time than its longest-waiting-for caller has left.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from prometheus_client import Histogram
from psycopg_pool import AsyncConnectionPool

from common import logging as bank_logging
from svc_transfer import store
from svc_transfer.store import Movement, MovementRequest

log = logging.getLogger(__name__)

# A batch holds its accounts' locks until its last movement is applied (~100 µs each in
# Postgres): 64 keep that window under about 10 ms. move_money_batch refuses more than 256.
BATCH_SIZE_MAX = 64
# Batches of one process in Postgres at once. Two keep one batch being applied while the next
# one travels; more only queue on the same hot rows and on Postgres' two cores.
BATCHES_IN_FLIGHT_MAX = 1
# Movements waiting beyond this are refused at once (LEDGER_BUSY) instead of queueing without bound.
QUEUE_LENGTH_MAX = 4096
# Least time worth a call: a movement with less left of its deadline is refused unsent.
CALL_MIN_S = 0.5

BATCH_SIZE = Histogram("ledger_batch_size", "Movements per move_money_batch call",
                       buckets=(1, 2, 4, 8, 16, 32, 64))


class MovementBatcher:
    """Applies movements in batches; `move` is what a use case awaits for one movement."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool
        # (the movement, its caller's future, its deadline on the loop's clock)
        self._waiting: deque[tuple[MovementRequest, asyncio.Future[Movement], float]] = deque()
        self._arrived = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = False

    async def move(self, request: MovementRequest) -> Movement:
        if len(self._waiting) >= QUEUE_LENGTH_MAX or self._stopping:
            raise store.LedgerBusy(f"{len(self._waiting)} movements waiting")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Movement] = loop.create_future()
        deadline = loop.time() + store.CALL_DEADLINE_S
        self._waiting.append((request, future, deadline))
        self._arrived.set()
        # A caller that stops waiting (its deadline, a cancel, a disconnect) leaves its movement in
        # the batch: it may move money all the same, exactly as a lost response would; a retry
        # with its request_id tells.
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(future)
        except TimeoutError:
            raise store.LedgerBusy(f"no answer within {store.CALL_DEADLINE_S:g} s; the outcome is unknown") from None
        finally:
            if not future.done():  # nobody awaits its outcome any more: no "never retrieved" log
                future.add_done_callback(_retrieve)

    async def start(self) -> None:
        self._loops = [asyncio.create_task(self._run(), name=f"ledger-batch-{i}") for i in range(BATCHES_IN_FLIGHT_MAX)]

    async def stop(self) -> None:
        """After the gRPC server stopped: apply what still waits, then end the loops."""
        self._stopping = True
        self._arrived.set()
        await asyncio.gather(*self._loops)

    async def _run(self) -> None:
        # Until stop(): then it applies what still waits and returns; it never ends otherwise.
        while True:
            if not self._waiting:
                if self._stopping:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            taken = [self._waiting.popleft() for _ in range(min(BATCH_SIZE_MAX, len(self._waiting)))]
            now = asyncio.get_running_loop().time()
            batch = []
            for request, future, deadline in taken:
                if deadline - now >= CALL_MIN_S:
                    batch.append((request, future, deadline))
                else:
                    future.set_exception(store.LedgerBusy(
                        f"waited {store.CALL_DEADLINE_S - (deadline - now):.1f} s behind a slow batch; not sent"))
            if not batch:
                continue
            BATCH_SIZE.observe(len(batch))
            timeout_s = max(deadline for _, _, deadline in batch) - now
            try:
                movements = await store.move_money_batch(self._pool, [request for request, _, _ in batch], timeout_s)
            except Exception as exc:  # every caller of the batch gets the error; the loop goes on
                if not isinstance(exc, store.LedgerBusy):
                    log.exception("move_money_batch failed", extra=bank_logging.fields(batch_size=len(batch)))
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future, _), movement in zip(batch, movements, strict=True):
                if not future.done():
                    future.set_result(movement)


def _retrieve(future: asyncio.Future[Movement]) -> None:
    if not future.cancelled():
        future.exception()

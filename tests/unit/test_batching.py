"""svc_transfer's group commit (batching.py): a movement's whole wait, queue and call, stays
within store.CALL_DEADLINE_S of its arrival, so that a batch stuck on Postgres (no leader for
seconds in a failover) never makes the next callers wait past Envoy's route timeout. The store's
call is replaced by a slow stand-in here: the stuck batch itself is caused for real in
tests/test_failover.py (kill -9 of the Postgres leader)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from svc_transfer import batching, store
from svc_transfer.store import Movement, MovementRequest

DEADLINE_S = 1.0
BOUND_S = 3 * DEADLINE_S  # every await of a test: a regression fails, never hangs


def movement(request_id: str) -> MovementRequest:
    return MovementRequest(initiator="teller:unit", request_id=request_id, kind="DEPOSIT", owner_id=None,
                           from_account_id=None, to_account_id="a", amount=1, currency="USD", description="",
                           event_headers={})


class StuckThenFine:
    """The first call hangs until its timeout times `overrun` (then LedgerBusy, as store._fetch
    raises; psycopg's cancel of a query may take seconds past the timeout); later calls answer
    at once. Records each call's movements and timeout."""

    def __init__(self, overrun: float = 1.0) -> None:
        self.calls: list[tuple[list[str], float]] = []
        self.overrun = overrun

    async def __call__(self, pool: object, requests: Sequence[MovementRequest],
                       timeout_s: float | None = None) -> list[Movement]:
        assert timeout_s is not None
        self.calls.append(([r.request_id for r in requests], timeout_s))
        if len(self.calls) == 1:
            await asyncio.sleep(timeout_s * self.overrun)
            raise store.LedgerBusy("stuck")
        return [Movement(error="ACCOUNT_NOT_FOUND", replayed=False, transfer=None) for _ in requests]


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> StuckThenFine:
    fake = StuckThenFine()
    monkeypatch.setattr(store, "CALL_DEADLINE_S", DEADLINE_S)
    monkeypatch.setattr(store, "move_money_batch", fake)
    return fake


async def test_a_movement_queued_behind_a_stuck_batch_gets_only_what_is_left_of_its_time(
        stand_in: StuckThenFine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batching, "CALL_MIN_S", 0.1)
    batcher = batching.MovementBatcher(pool=None)  # type: ignore[arg-type]  # the stand-in takes no pool
    await batcher.start()
    try:
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(batcher.move(movement("first")))
        await asyncio.sleep(0.3)  # the first batch is stuck; it ends 0.7 s from now
        started = loop.time()
        second = await asyncio.wait_for(batcher.move(movement("second")), BOUND_S)  # queued behind it
        waited_s = loop.time() - started
        with pytest.raises(store.LedgerBusy):
            await asyncio.wait_for(first, BOUND_S)
    finally:
        await asyncio.wait_for(batcher.stop(), BOUND_S)
    assert second.error == "ACCOUNT_NOT_FOUND"
    [(ids_1, timeout_1), (ids_2, timeout_2)] = stand_in.calls
    assert (ids_1, ids_2) == (["first"], ["second"])
    assert timeout_1 == pytest.approx(DEADLINE_S, abs=0.05)
    # Sent about 0.7 s after it arrived: its call got the 0.3 s left, not a whole deadline.
    assert timeout_2 == pytest.approx(0.3, abs=0.1)
    assert waited_s < DEADLINE_S


async def test_a_movement_left_with_too_little_time_is_refused_unsent(
        stand_in: StuckThenFine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batching, "CALL_MIN_S", 0.5)
    batcher = batching.MovementBatcher(pool=None)  # type: ignore[arg-type]
    await batcher.start()
    try:
        first = asyncio.create_task(batcher.move(movement("first")))
        await asyncio.sleep(0.2)  # when the first ends, 0.2 s of the second's deadline is left
        with pytest.raises(store.LedgerBusy, match="not sent"):
            await asyncio.wait_for(batcher.move(movement("second")), BOUND_S)
        with pytest.raises(store.LedgerBusy):
            await asyncio.wait_for(first, BOUND_S)
    finally:
        await asyncio.wait_for(batcher.stop(), BOUND_S)
    assert [ids for ids, _ in stand_in.calls] == [["first"]]  # the second never reached the store


async def test_a_caller_hears_ledger_busy_at_its_deadline_even_when_the_call_overruns(
        stand_in: StuckThenFine) -> None:
    stand_in.overrun = 2.5  # the call ends 2.5 deadlines after it began
    batcher = batching.MovementBatcher(pool=None)  # type: ignore[arg-type]
    await batcher.start()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(store.LedgerBusy, match="outcome is unknown"):
            await asyncio.wait_for(batcher.move(movement("first")), BOUND_S)
        heard_after_s = loop.time() - started
    finally:
        await asyncio.wait_for(batcher.stop(), BOUND_S)
    assert heard_after_s == pytest.approx(DEADLINE_S, abs=0.2)

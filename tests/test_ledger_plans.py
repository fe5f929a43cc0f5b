"""The ledger's work per batch must not grow with what the ledger holds: a batch reads the rows
it names through their keys, whatever the number of PENDING holds (migrations/0008).

Counted by Postgres itself: pg_stat_get_xact_* give the index entries and scans of the current
transaction, so each measured batch runs alone in a transaction of its own."""

from __future__ import annotations

from collections.abc import Sequence

import psycopg
from psycopg_pool import AsyncConnectionPool

from common.config import Settings
from svc_transfer import store
from svc_transfer.store import Movement, MovementRequest
from tests.batch_support import hold, settle, transfer
from tests.ledger_support import Account, Bank

HOLDS_PER_BATCH = 200  # batch_size_max is 256


async def place_holds(pool: AsyncConnectionPool, source: Account, target: Account) -> list[str]:
    movements = await store.move_money_batch(pool, [hold(source, target, 1) for _ in range(HOLDS_PER_BATCH)])
    assert all(m.error is None and m.transfer is not None for m in movements)
    return [m.transfer.transfer_id for m in movements if m.transfer is not None]


async def reads_of(settings: Settings, requests: Sequence[MovementRequest]) -> tuple[list[Movement], dict[str, int]]:
    """The batch's results, and what it read of transfers in its transaction: entries returned
    by each index of the table, and its sequential scans ("seq scans")."""
    async with await psycopg.AsyncConnection.connect(settings.pg_conninfo, options="-c search_path=transfer") as conn:
        async with conn.transaction():
            cursor = await conn.execute(store.MOVE_MONEY_BATCH, store.batch_params(requests))
            movements = store.batch_results(requests, await cursor.fetchall())
            cursor = await conn.execute(
                "SELECT i.indexrelid::regclass::text, pg_stat_get_xact_tuples_returned(i.indexrelid)"
                " FROM pg_index i WHERE i.indrelid = 'transfers'::regclass"
                " UNION ALL SELECT 'seq scans', pg_stat_get_xact_numscans('transfers'::regclass)")
            reads = {name.removeprefix("transfer."): count for name, count in await cursor.fetchall()}
    return movements, reads


async def test_a_batch_reads_transfers_by_key_whatever_the_number_of_pending_holds(
        bank: Bank, pool: AsyncConnectionPool, settings: Settings) -> None:
    payer, payee = await bank.open_account(), await bank.open_account()
    await bank.deposit(payer, 10 * HOLDS_PER_BATCH)
    pending = await place_holds(pool, payer, payee)

    async def measured(kind: str, hold_id: str | None = None) -> dict[str, int]:
        request = transfer(payer, payee, 1) if hold_id is None else settle(kind, payee, hold_id)
        movements, reads = await reads_of(settings, [request])
        assert movements[0].error is None, movements[0]
        return reads

    before = {"transfer": await measured("TRANSFER"), "post": await measured("POST", pending.pop()),
              "void": await measured("VOID", pending.pop())}
    pending += await place_holds(pool, payer, payee)  # twice as many PENDING holds, at least
    after = {"transfer": await measured("TRANSFER"), "post": await measured("POST", pending.pop()),
             "void": await measured("VOID", pending.pop())}
    for kind, reads in after.items():
        # 0006's generic plan walked this index for every batch that wrote: every PENDING hold.
        assert reads["holds_pending_by_expiry"] == 0, (kind, reads)
        assert reads["seq scans"] == 0, (kind, reads)
        assert reads == before[kind], f"{kind}: reads grew with the pending holds: {before[kind]} -> {reads}"

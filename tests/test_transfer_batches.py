"""Group commit (svc_transfer/batching.py, migrations/0005): movements applied many to a
transaction must each get exactly the result they would get alone, in arrival order, and an
operating error of a batch must write nothing of it."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import urllib.request
import uuid
from collections.abc import AsyncIterator

import grpc
import psycopg
import pytest
from bank.transfer.v1 import ledger_pb2
from psycopg_pool import AsyncConnectionPool

from common import db
from common.config import Settings
from common.errors import reason_of
from devstack.stack import Stack
from svc_transfer import store
from svc_transfer.store import MovementRequest
from tests.ledger_support import Account, Bank, new_request_id, sql


@pytest.fixture(scope="module")
async def bank(stack: Stack, settings: Settings) -> AsyncIterator[Bank]:
    # The first process's own port: every call of this module reaches one batcher.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.private_grpc_port('transfer', 0)}") as channel:
        yield Bank(settings, channel)


@pytest.fixture
async def pool(stack: Stack, settings: Settings) -> AsyncIterator[AsyncConnectionPool]:
    pool = await db.open_pool(settings, "transfer")
    try:
        yield pool
    finally:
        await pool.close()


def transfer(source: Account, target: Account, amount: int, request_id: str | None = None) -> MovementRequest:
    return MovementRequest(f"customer:{source.customer_id}", request_id or new_request_id(), "TRANSFER",
                           source.customer_id, source.account_id, target.account_id, amount, source.currency, "", {})


def deposit(target: Account, amount: int) -> MovementRequest:
    return MovementRequest("teller:tests", new_request_id(), "DEPOSIT", None, None, target.account_id, amount,
                           target.currency, "", {})


async def test_a_batch_applies_each_movement_in_order_with_its_own_result(bank: Bank, pool: AsyncConnectionPool) -> None:
    a, b, c = [await bank.open_account() for _ in range(3)]
    await bank.deposit(a, 100)
    first = transfer(a, b, 60)
    unknown = Account(str(uuid.uuid4()), a.customer_id, "USD")
    results = await store.move_money_batch(pool, [
        first,
        transfer(a, b, 60),  # 40 left after the first: refused, and writes nothing
        transfer(b, a, 10),  # sees the first one's credit
        first,  # the same request again in the same batch: the first one's transfer, nothing moved
        transfer(a, b, 61, request_id=first.request_id),  # the same request_id, other parameters
        deposit(c, 5),
        transfer(a, unknown, 1),
    ])
    assert [r.error for r in results] == [None, "INSUFFICIENT_FUNDS", None, None, "IDEMPOTENCY_KEY_REUSED", None,
                                          "ACCOUNT_NOT_FOUND"]
    assert [r.replayed for r in results] == [False, False, False, True, False, False, False]
    assert results[0].transfer is not None and results[3].transfer == results[0].transfer
    assert await bank.balances(a, b, c) == [50, 50, 5]


async def test_a_batch_gives_each_refusal_in_order_and_writes_only_what_it_accepted(
        bank: Bank, pool: AsyncConnectionPool, settings: Settings) -> None:
    """migrations/0005 decides a whole batch at once on arrays: every refusal reason comes back
    at its own position, a refused movement changes nothing for the later ones (not even its
    idempotency key, which a later movement may then use), and exactly the accepted movements
    are written: one transfer, two entries summing to zero, one idempotency record and one
    outbox row each, stamped in arrival order."""
    a, b, frozen = [await bank.open_account() for _ in range(3)]
    euros = await bank.open_account("EUR", customer_id=a.customer_id)
    await bank.deposit(a, 100)
    await bank.deposit(frozen, 10)
    await bank.set_status(frozen, ledger_pb2.LedgerAccount.FROZEN)
    retried_key = new_request_id()
    stranger = dataclasses.replace(transfer(a, b, 1), owner_id=str(uuid.uuid4()))  # not a's owner
    batch = [
        transfer(a, b, 30),                                         # 70 left
        dataclasses.replace(transfer(a, b, 1), amount=0),           # INVALID_AMOUNT
        transfer(a, a, 1),                                          # SAME_ACCOUNT
        stranger,                                                   # ACCOUNT_NOT_FOUND
        transfer(frozen, b, 1),                                     # ACCOUNT_INACTIVE
        dataclasses.replace(transfer(a, euros, 1), currency="USD"),  # CURRENCY_MISMATCH (euros is EUR)
        transfer(a, b, 71, request_id=retried_key),                 # INSUFFICIENT_FUNDS: writes nothing...
        transfer(a, b, 70, request_id=retried_key),                 # ...so its key is free: 0 left
        deposit(a, 5),                                              # the cash account pays: 5 left
        transfer(a, b, 5),                                          # sees the deposit: 0 left
    ]
    results = await store.move_money_batch(pool, batch)
    assert [r.error for r in results] == [
        None, "INVALID_AMOUNT", "SAME_ACCOUNT", "ACCOUNT_NOT_FOUND", "ACCOUNT_INACTIVE", "CURRENCY_MISMATCH",
        "INSUFFICIENT_FUNDS", None, None, None]
    # (The overflow refusal, INVALID_AMOUNT too, needs a balance near int64's top: test_transfer.py.)
    assert await bank.balances(a, b, frozen, euros) == [0, 105, 10, 0]
    accepted = [r.transfer for r in results if r.transfer is not None]
    assert [t.amount for t in accepted] == [30, 70, 5, 5] and not any(r.replayed for r in results)
    ids = [t.transfer_id for t in accepted]
    written = sql(settings, "SELECT (SELECT count(*) FROM transfer.transfers WHERE transfer_id = ANY(%(ids)s::uuid[])),"
                            " (SELECT count(*) FROM transfer.entries WHERE transfer_id = ANY(%(ids)s::uuid[])),"
                            " (SELECT sum(amount) FROM transfer.entries WHERE transfer_id = ANY(%(ids)s::uuid[])),"
                            " (SELECT count(*) FROM transfer.idempotency_keys WHERE transfer_id = ANY(%(ids)s::uuid[])),"
                            " (SELECT count(*) FROM transfer.outbox WHERE aggregate_id = ANY(%(texts)s))",
                  {"ids": ids, "texts": ids})
    assert written == [(4, 8, 0, 4, 4)]
    refused_keys = [m.request_id for m, r in zip(batch, results, strict=True) if r.error is not None]
    assert sql(settings, "SELECT count(*) FROM transfer.idempotency_keys WHERE request_id = ANY(%s)",
               (refused_keys,)) == [(1,)]  # only retried_key's, by the accepted retry
    # a's entries, newest first, are the batch's movements in reverse arrival order.
    history = sql(settings, "SELECT transfer_id::text, balance_after FROM transfer.entries WHERE account_id = %s"
                            " ORDER BY create_time DESC, transfer_id DESC", (a.account_id,))
    assert history[:4] == [(ids[3], 0), (ids[2], 5), (ids[1], 0), (ids[0], 70)]
    assert len({t.create_time for t in accepted}) == 4


async def test_an_operating_error_fails_the_whole_batch_and_writes_nothing(
        bank: Bank, pool: AsyncConnectionPool, settings: Settings) -> None:
    a, b, c, d = [await bank.open_account() for _ in range(4)]
    await bank.deposit(a, 100)
    await bank.deposit(c, 100)
    # Another transaction holds b's row lock past the ledger's 1 s lock_timeout.
    async with await psycopg.AsyncConnection.connect(settings.pg_conninfo) as holder:
        await holder.execute("SELECT 1 FROM transfer.ledger_accounts WHERE account_id = %s FOR UPDATE", (b.account_id,))
        with pytest.raises(store.LedgerBusy):
            await store.move_money_batch(pool, [transfer(c, d, 7), transfer(a, b, 5)])
        await holder.rollback()
    assert await bank.balances(a, b, c, d) == [100, 0, 100, 0]


def _batch_metrics(settings: Settings) -> tuple[float, float]:
    """(batches, movements) of svc_transfer's first process so far."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{settings.metrics_port('transfer', 0)}/metrics", timeout=5).read()
    values = dict(re.findall(r"^ledger_batch_size_(count|sum) (\S+)$", text.decode(), re.MULTILINE))
    return float(values["count"]), float(values["sum"])


async def test_concurrent_requests_are_batched_and_each_caller_gets_its_own_answer(
        bank: Bank, settings: Settings) -> None:
    source, target = await bank.open_account(), await bank.open_account()
    await bank.deposit(source, 1_000)
    batches_before, movements_before = _batch_metrics(settings)

    async def attempt(amount: int) -> str:
        try:
            await bank.transfer(source, target, amount)
            return "OK"
        except grpc.aio.AioRpcError as error:
            return reason_of(error) or error.code().name

    # 64 at once: 33 of them fit (1,000 = 33 × 30 + 10), the other 31 find too little left.
    outcomes = await asyncio.gather(*(attempt(30) for _ in range(64)))
    batches_after, movements_after = _batch_metrics(settings)
    assert outcomes.count("OK") == 33 and outcomes.count("INSUFFICIENT_FUNDS") == 31, outcomes
    assert await bank.balances(source, target) == [10, 990]
    # Fewer calls of move_money_batch than movements: they were applied together.
    assert movements_after - movements_before >= 64
    assert batches_after - batches_before < movements_after - movements_before


async def test_each_event_carries_its_own_requests_headers(bank: Bank, pool: AsyncConnectionPool) -> None:
    """Each outbox row carries the Kafka headers of its own request (request id, traceparent,
    tracestate), whatever the others of its batch carry; empty values are left out."""
    a, b = await bank.open_account(), await bank.open_account()
    await bank.deposit(a, 100)
    traceparent = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"
    sent = [
        {"request_id": "plain-" + uuid.uuid4().hex},
        {"request_id": "traced-" + uuid.uuid4().hex, "traceparent": traceparent, "tracestate": "bank=1"},
        {"request_id": '{"not": "json headers"} ' + uuid.uuid4().hex},
        {"request_id": "", "traceparent": traceparent},
        {"request_id": ""},
    ]
    requests = [dataclasses.replace(transfer(a, b, 1), event_headers=headers) for headers in sent]
    results = await store.move_money_batch(pool, requests)
    assert [r.error for r in results] == [None] * len(sent)
    async with pool.connection() as conn:
        cursor = await conn.execute("SELECT aggregate_id, headers FROM transfer.outbox WHERE aggregate_id = ANY(%s)",
                                    ([r.transfer.transfer_id for r in results if r.transfer],))
        stored: dict[str, dict[str, str]] = dict(await cursor.fetchall())
    assert [stored[r.transfer.transfer_id] for r in results if r.transfer] == [
        sent[0], sent[1], sent[2], {"traceparent": traceparent}, {}]


async def test_a_lost_connection_is_ledger_busy_and_the_retry_moves_once(bank: Bank, settings: Settings) -> None:
    """A connection lost while its batch runs (Postgres restarted, the backend terminated) is an
    operating error like a timeout, LEDGER_BUSY for the batch, not an unclassified error (which
    the interceptor answers INTERNAL); the pool replaces the connection and the retry moves once."""
    a, b = await bank.open_account(), await bank.open_account()
    await bank.deposit(a, 100)
    pool = AsyncConnectionPool(db.conninfo(settings, "transfer"), min_size=1, max_size=1, open=False)
    await pool.open(wait=True, timeout=30)
    request = transfer(a, b, 30)
    try:
        async with pool.connection() as conn:
            backend = conn.info.backend_pid
        async with await psycopg.AsyncConnection.connect(settings.pg_conninfo, autocommit=True) as admin:
            # b's row lock held elsewhere keeps the batch waiting inside its statement...
            async with await psycopg.AsyncConnection.connect(settings.pg_conninfo) as holder:
                await holder.execute("SELECT 1 FROM transfer.ledger_accounts WHERE account_id = %s FOR UPDATE",
                                     (b.account_id,))
                moving = asyncio.create_task(store.move_money_batch(pool, [request]))
                for _ in range(100):
                    cursor = await admin.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                                                 (backend,))
                    if await cursor.fetchone() == ("Lock",):
                        break
                    await asyncio.sleep(0.01)
                else:
                    raise AssertionError("the batch never waited for b's lock")
                # ...until its backend is terminated under it.
                await admin.execute("SELECT pg_terminate_backend(%s)", (backend,))
                with pytest.raises(store.LedgerBusy):
                    await moving
                await holder.rollback()
        assert await bank.balances(a, b) == [100, 0]
        [retried] = await store.move_money_batch(pool, [request])
        [replayed] = await store.move_money_batch(pool, [request])
    finally:
        await pool.close()
    assert retried.error is None and not retried.replayed
    assert replayed.replayed and replayed.transfer == retried.transfer
    assert await bank.balances(a, b) == [70, 30]


async def test_a_pooled_connection_whose_backend_ended_is_replaced_before_use(
        bank: Bank, settings: Settings) -> None:
    """The pool checks a connection before handing it out (common/db.py check_alive): one whose
    backend ended while it sat idle is discarded, and the caller gets a live one, not an error."""
    a, b = await bank.open_account(), await bank.open_account()
    await bank.deposit(a, 100)
    pool = AsyncConnectionPool(db.conninfo(settings, "transfer"), min_size=1, max_size=1, open=False,
                               check=db.check_alive)
    await pool.open(wait=True, timeout=30)
    try:
        async with pool.connection() as conn:
            backend = conn.info.backend_pid
        async with await psycopg.AsyncConnection.connect(settings.pg_conninfo, autocommit=True) as admin:
            await admin.execute("SELECT pg_terminate_backend(%s)", (backend,))
            for _ in range(100):  # the backend has gone once it is no longer listed
                cursor = await admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (backend,))
                if await cursor.fetchone() is None:
                    break
                await asyncio.sleep(0.01)
        [moved] = await store.move_money_batch(pool, [transfer(a, b, 30)])
        async with pool.connection() as conn:
            assert conn.info.backend_pid != backend
    finally:
        await pool.close()
    assert moved.error is None
    assert await bank.balances(a, b) == [70, 30]

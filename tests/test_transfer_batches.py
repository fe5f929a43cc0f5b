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
from bank.events.v1 import events_pb2
from bank.transfer.v1 import ledger_pb2
from psycopg_pool import AsyncConnectionPool

from common import db
from common.config import Settings
from common.errors import reason_of
from devstack.stack import Stack
from svc_transfer import events as transfer_events
from svc_transfer import store
from tests.batch_support import deposit, hold, settle, transfer
from tests.ledger_support import Account, Bank, age_holds, holds_invariants, new_request_id, sql


@pytest.fixture(scope="module")
async def bank(stack: Stack, settings: Settings) -> AsyncIterator[Bank]:
    # The first process's own port: every call of this module reaches one batcher.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.private_grpc_port('transfer', 0)}") as channel:
        yield Bank(settings, channel)


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


# --- holds (migrations/0006): POST, VOID and EXPIRE in the same batch ---------------------------

def hold_rows(settings: Settings, ids: list[str]) -> dict[str, tuple[str, int, int, bool]]:
    """(status, amount, held_amount, settled) by hold id, as stored."""
    rows = sql(settings, "SELECT transfer_id::text, status, amount, held_amount, settle_time IS NOT NULL"
                         " FROM transfer.transfers WHERE transfer_id = ANY(%s::uuid[])", (ids,))
    return {row[0]: row[1:] for row in rows}


def pending(settings: Settings, *accounts: Account) -> list[tuple[int, int]]:
    """(pending_debits, pending_credits) of each account."""
    rows = {row[0]: (row[1], row[2]) for row in sql(
        settings, "SELECT account_id::text, pending_debits, pending_credits FROM transfer.ledger_accounts"
                  " WHERE account_id = ANY(%s::uuid[])", ([a.account_id for a in accounts],))}
    return [rows[a.account_id] for a in accounts]


def written_rows(settings: Settings, ids: list[str]) -> dict[str, tuple[int, int, int, list[str]]]:
    """Per transfer id: (entries, their sum, idempotency keys naming it, outbox event types in order)."""
    rows = sql(settings,
               "SELECT t.id::text,"
               " (SELECT count(*) FROM transfer.entries e WHERE e.transfer_id = t.id),"
               " (SELECT coalesce(sum(e.amount), 0) FROM transfer.entries e WHERE e.transfer_id = t.id),"
               " (SELECT count(*) FROM transfer.idempotency_keys k WHERE k.transfer_id = t.id"
               "   OR k.settled_transfer_id = t.id),"
               " (SELECT coalesce(array_agg(o.event_type ORDER BY o.outbox_id), '{}') FROM transfer.outbox o"
               "   WHERE o.aggregate_id = t.id::text)"
               " FROM unnest(%s::uuid[]) AS t(id)", (ids,))
    return {row[0]: (row[1], row[2], row[3], [t.removeprefix("bank.events.v1.") for t in row[4]]) for row in rows}


async def test_a_batch_mixes_holds_posts_and_voids_each_in_arrival_order(
        bank: Bank, pool: AsyncConnectionPool, settings: Settings) -> None:
    """One batch: a transfer, a new hold, a post, a void, a second settlement of the voided hold and
    the post again (its replay). Each gets its own answer in arrival order, and exactly what each
    accepted operation writes is written: a transfer two entries, a key and a MoneyMoved; a hold a
    row, a key and a HoldPlaced, no entry; a post the hold's two entries, a key, HoldPosted then
    MoneyMoved; a void a key and a HoldVoided."""
    payer, payee = await bank.open_account(), await bank.open_account()
    await bank.deposit(payer, 1000)
    placed = await store.move_money_batch(pool, [hold(payer, payee, 200), hold(payer, payee, 300)])
    assert [(m.error, m.transfer and (m.transfer.status, m.transfer.amount, m.transfer.held_amount))
            for m in placed] == [(None, ("PENDING", 200, 200)), (None, ("PENDING", 300, 300))]
    first, second = [m.transfer.transfer_id for m in placed if m.transfer is not None]
    assert pending(settings, payer, payee) == [(500, 0), (0, 500)]

    post = settle("POST", payee, first)
    batch = [
        transfer(payer, payee, 100),        # available 1000 - 500 - 100 = 400
        hold(payer, payee, 150),            # available 250
        post,                               # all of first: balance 700, pending 150 + 300 - 200
        settle("VOID", payee, second),      # pending 150
        settle("POST", payee, second, 10),  # second is VOIDED now: refused, the status named
        post,                               # the post again: its first answer, nothing moved
        transfer(payer, payee, 551),        # 700 - 150 available: refused
    ]
    results = await store.move_money_batch(pool, batch)
    assert [(r.error, r.replayed, r.status) for r in results] == [
        (None, False, None), (None, False, None), (None, False, None), (None, False, None),
        ("TRANSFER_NOT_PENDING", False, "VOIDED"), (None, True, None), ("INSUFFICIENT_FUNDS", False, None)]
    moved, new_hold, posted, voided, _, replayed, _ = [r.transfer for r in results]
    assert moved is not None and new_hold is not None and posted is not None and voided is not None
    assert (moved.status, moved.held_amount, moved.expire_time) == ("COMPLETED", None, None)
    assert (new_hold.status, new_hold.amount, new_hold.held_amount) == ("PENDING", 150, 150)
    assert new_hold.expire_time is not None and (new_hold.expire_time - new_hold.create_time).total_seconds() == 3600
    # A settlement answers with the hold: its id, request_id and creation time, the new status.
    assert (posted.transfer_id, posted.status, posted.amount, posted.held_amount) == (first, "COMPLETED", 200, 200)
    assert posted.request_id == batch_request_id(placed, 0) and posted.create_time == placed[0].transfer.create_time  # type: ignore[union-attr]
    assert (voided.transfer_id, voided.status, voided.amount, voided.held_amount) == (second, "VOIDED", 300, 300)
    assert replayed == posted
    assert await bank.balances(payer, payee) == [700, 300]
    assert pending(settings, payer, payee) == [(150, 0), (0, 150)]
    assert hold_rows(settings, [first, second, new_hold.transfer_id]) == {
        first: ("COMPLETED", 200, 200, True), second: ("VOIDED", 300, 300, True),
        new_hold.transfer_id: ("PENDING", 150, 150, False)}
    assert written_rows(settings, [moved.transfer_id, new_hold.transfer_id, first, second]) == {
        moved.transfer_id: (2, 0, 1, ["MoneyMoved"]),
        new_hold.transfer_id: (0, 0, 1, ["HoldPlaced"]),
        first: (2, 0, 2, ["HoldPlaced", "HoldPosted", "MoneyMoved"]),   # its creation's key and the post's
        second: (0, 0, 2, ["HoldPlaced", "HoldVoided"]),
    }
    # The post's entries carry the post's time, after the hold's creation.
    [(entry_time,)] = sql(settings, "SELECT DISTINCT create_time FROM transfer.entries WHERE transfer_id = %s",
                          (first,))
    assert entry_time > posted.create_time

    # A later retry of the post and of the first hold's creation: their first answers.
    again = await store.move_money_batch(pool, [post, dataclasses.replace(
        hold(payer, payee, 200), request_id=batch_request_id(placed, 0))])
    assert again[0].replayed and again[0].transfer == posted
    assert again[1].replayed and again[1].transfer == dataclasses.replace(posted, status="PENDING")
    assert await bank.balances(payer, payee) == [700, 300]
    # Reused keys: a post naming the whole amount is not a post without one.
    reused = await store.move_money_batch(pool, [dataclasses.replace(post, amount=200)])
    assert reused[0].error == "IDEMPOTENCY_KEY_REUSED"

    # The listing shows the holds in every status and the plain movements, newest first.
    listed = await store.LedgerStore(pool).account_transfers(payer.account_id, None, 10)
    assert [(t.transfer_id, t.status) for t in listed][:4] == [
        (new_hold.transfer_id, "PENDING"), (moved.transfer_id, "COMPLETED"), (second, "VOIDED"),
        (first, "COMPLETED")]
    page = await store.LedgerStore(pool).account_transfers(payer.account_id, (listed[1].create_time,
                                                                              listed[1].transfer_id), 2)
    assert [t.transfer_id for t in page] == [second, first]
    holds_invariants(settings, [payer.account_id, payee.account_id])


def batch_request_id(results: list[store.Movement], index: int) -> str:
    transfer = results[index].transfer
    assert transfer is not None
    return transfer.request_id


async def test_every_hold_event_is_built_from_its_frozen_rows(
        bank: Bank, pool: AsyncConnectionPool, settings: Settings) -> None:
    """The relay builds each event's bytes from the committed rows, perhaps after the hold changed
    again: a HoldPlaced built after the post still says what was placed."""
    payer, payee = await bank.open_account(), await bank.open_account()
    await bank.deposit(payer, 1000)
    placed = await store.move_money_batch(pool, [hold(payer, payee, 400), hold(payer, payee, 50),
                                                 hold(payer, payee, 60)])
    posted_id, voided_id, expired_id = [m.transfer.transfer_id for m in placed if m.transfer is not None]
    await store.move_money_batch(pool, [settle("POST", payee, posted_id, 150), settle("VOID", payee, voided_id)])
    age_holds(settings, [expired_id], 3600)
    await release_until_settled(pool, settings, [expired_id])
    events = sql(settings, "SELECT event_id::text, aggregate_id, event_type FROM transfer.outbox"
                           " WHERE aggregate_id = ANY(%s) ORDER BY outbox_id", ([posted_id, voided_id, expired_id],))
    async with await psycopg.AsyncConnection.connect(db.conninfo(settings, "transfer")) as conn:
        payloads = await transfer_events.payloads(conn, [e[0] for e in events])
    decoded = {(aggregate, event_type.removeprefix("bank.events.v1.")):
               getattr(events_pb2, event_type.removeprefix("bank.events.v1.")).FromString(payloads[event_id])
               for event_id, aggregate, event_type in events}
    assert sorted(decoded) == sorted([(posted_id, "HoldPlaced"), (posted_id, "HoldPosted"), (posted_id, "MoneyMoved"),
                                      (voided_id, "HoldPlaced"), (voided_id, "HoldVoided"),
                                      (expired_id, "HoldPlaced"), (expired_id, "HoldExpired")])
    placed_event = decoded[(posted_id, "HoldPlaced")]
    assert (placed_event.held_amount, placed_event.from_account_id, placed_event.to_customer_id) == (
        400, payer.account_id, payee.customer_id)
    posted_event, moved_event = decoded[(posted_id, "HoldPosted")], decoded[(posted_id, "MoneyMoved")]
    assert (posted_event.amount, posted_event.held_amount) == (150, 400)
    assert (moved_event.amount, moved_event.from_balance_after, moved_event.to_balance_after) == (150, 850, 150)
    assert moved_event.create_time == posted_event.create_time  # the post's time, not the hold's
    assert moved_event.create_time.ToDatetime() > placed_event.create_time.ToDatetime()
    assert decoded[(voided_id, "HoldVoided")].held_amount == 50
    expired_event = decoded[(expired_id, "HoldExpired")]
    assert expired_event.held_amount == 60 and expired_event.create_time.ToDatetime() >= \
        expired_event.expire_time.ToDatetime()


async def test_refused_hold_operations_write_nothing(
        bank: Bank, pool: AsyncConnectionPool, settings: Settings) -> None:
    """Every refusal of a hold operation, in the design's rule order, and none writes a row."""
    payer, payee, stranger = [await bank.open_account() for _ in range(3)]
    await bank.deposit(payer, 100)
    [placed] = await store.move_money_batch(pool, [hold(payer, payee, 80)])
    assert placed.transfer is not None
    hold_id = placed.transfer.transfer_id
    [plain] = await store.move_money_batch(pool, [transfer(payer, stranger, 5)])
    assert plain.transfer is not None
    before = written_rows(settings, [hold_id, plain.transfer.transfer_id])
    batch = [
        hold(payer, payee, 16),                                            # available 15
        settle("POST", payee, str(uuid.uuid4())),                          # no such transfer
        settle("POST", stranger, hold_id),                                 # owns neither side
        settle("VOID", payee, hold_id, owner_id=payer.customer_id),        # the payer
        settle("POST", payee, hold_id, 81),                                # more than held
        settle("POST", payee, hold_id, 0),
        settle("POST", payee, plain.transfer.transfer_id,                  # never a hold
               owner_id=stranger.customer_id),
        dataclasses.replace(hold(payer, payee, 1), hold_seconds=None, amount=101),  # a plain one: available 15
    ]
    results = await store.move_money_batch(pool, batch)
    assert [(r.error, r.status) for r in results] == [
        ("INSUFFICIENT_FUNDS", None), ("TRANSFER_NOT_FOUND", None), ("TRANSFER_NOT_FOUND", None),
        ("NOT_PAYEE", None), ("EXCEEDS_HELD_AMOUNT", None), ("INVALID_AMOUNT", None),
        ("TRANSFER_NOT_PENDING", "COMPLETED"), ("INSUFFICIENT_FUNDS", None)]
    assert all(r.transfer is None for r in results)
    assert written_rows(settings, [hold_id, plain.transfer.transfer_id]) == before
    assert sql(settings, "SELECT count(*) FROM transfer.idempotency_keys WHERE request_id = ANY(%s)",
               ([m.request_id for m in batch],)) == [(0,)]
    assert hold_rows(settings, [hold_id]) == {hold_id: ("PENDING", 80, 80, False)}
    assert pending(settings, payer, payee) == [(80, 0), (0, 80)]
    assert await bank.balances(payer, payee, stranger) == [95, 0, 5]
    # A frozen payee: the post is refused and the hold stays PENDING; a void still releases it.
    await bank.set_status(payee, ledger_pb2.LedgerAccount.FROZEN)
    [frozen] = await store.move_money_batch(pool, [settle("POST", payee, hold_id)])
    assert frozen.error == "ACCOUNT_INACTIVE" and hold_rows(settings, [hold_id])[hold_id][0] == "PENDING"
    [released] = await store.move_money_batch(pool, [settle("VOID", payee, hold_id)])
    assert released.transfer is not None and released.transfer.status == "VOIDED"
    holds_invariants(settings, [payer.account_id, payee.account_id, stranger.account_id])


async def test_a_partial_post_moves_part_and_releases_the_rest(
        bank: Bank, pool: AsyncConnectionPool, settings: Settings) -> None:
    payer, payee = await bank.open_account(), await bank.open_account()
    await bank.deposit(payer, 500)
    [placed] = await store.move_money_batch(pool, [hold(payer, payee, 500)])
    assert placed.transfer is not None
    hold_id = placed.transfer.transfer_id
    accounts = await store.LedgerStore(pool).customer_accounts([payer.account_id])
    assert (accounts[payer.account_id].balance, accounts[payer.account_id].available_balance) == (500, 0)
    [refused_transfer] = await store.move_money_batch(pool, [transfer(payer, payee, 1)])
    assert refused_transfer.error == "INSUFFICIENT_FUNDS"
    [exceeds] = await store.move_money_batch(pool, [settle("POST", payee, hold_id, 501)])
    assert exceeds.error == "EXCEEDS_HELD_AMOUNT"
    [posted] = await store.move_money_batch(pool, [settle("POST", payee, hold_id, 120)])
    assert posted.transfer is not None
    assert (posted.transfer.status, posted.transfer.amount, posted.transfer.held_amount) == ("COMPLETED", 120, 500)
    assert await bank.balances(payer, payee) == [380, 120]
    assert pending(settings, payer, payee) == [(0, 0), (0, 0)]
    entries = sql(settings, "SELECT account_id::text, amount, balance_after FROM transfer.entries"
                            " WHERE transfer_id = %s ORDER BY amount", (hold_id,))
    assert entries == [(payer.account_id, -120, 380), (payee.account_id, 120, 120)]
    accounts = await store.LedgerStore(pool).customer_accounts([payer.account_id])
    assert accounts[payer.account_id].available_balance == 380
    [again] = await store.move_money_batch(pool, [settle("POST", payee, hold_id, 1)])
    assert (again.error, again.status) == ("TRANSFER_NOT_PENDING", "COMPLETED")
    holds_invariants(settings, [payer.account_id, payee.account_id])


async def release_until_settled(pool: AsyncConnectionPool, settings: Settings, ids: list[str]) -> list[store.Movement]:
    """release_lapsed_holds until none of these holds is PENDING (svc_transfer's own worker may
    release some first): what these calls released of them."""
    released: list[store.Movement] = []
    for _ in range(50):
        results = await store.release_lapsed_holds(pool, 64)
        released += [r for r in results if r.transfer is not None and r.transfer.transfer_id in ids]
        if all(status != "PENDING" for status, *_ in hold_rows(settings, ids).values()):
            return released
        await asyncio.sleep(0.1)
    raise AssertionError(f"holds still PENDING: {hold_rows(settings, ids)}")


async def test_a_lapsed_hold_is_expired_for_every_caller_before_and_after_its_release(
        bank: Bank, pool: AsyncConnectionPool, settings: Settings) -> None:
    payer, payee = await bank.open_account(), await bank.open_account()
    await bank.deposit(payer, 100)
    [placed, kept] = await store.move_money_batch(pool, [hold(payer, payee, 70, 60), hold(payer, payee, 30, 60)])
    assert placed.transfer is not None and kept.transfer is not None
    hold_id = placed.transfer.transfer_id
    assert age_holds(settings, [hold_id], 60) == 1  # expire_time = create_time: lapsed
    # Lapsed, released or not: posts and voids are refused, whatever the worker did meanwhile.
    results = await store.move_money_batch(pool, [settle("POST", payee, hold_id), settle("VOID", payee, hold_id)])
    assert [r.error for r in results] == ["HOLD_EXPIRED", "HOLD_EXPIRED"]
    released = await release_until_settled(pool, settings, [hold_id])
    # Released by this call or, first, by svc_transfer's own worker: by this call at most once.
    assert len(released) <= 1
    assert all(r.error is None and r.transfer is not None and r.transfer.status == "EXPIRED" for r in released)
    assert hold_rows(settings, [hold_id]) == {hold_id: ("EXPIRED", 70, 70, True)}
    results = await store.move_money_batch(pool, [settle("POST", payee, hold_id), settle("VOID", payee, hold_id)])
    assert [r.error for r in results] == ["HOLD_EXPIRED", "HOLD_EXPIRED"]
    assert pending(settings, payer, payee) == [(30, 0), (0, 30)]  # the other hold had not lapsed
    assert await bank.balances(payer, payee) == [100, 0]
    assert written_rows(settings, [hold_id])[hold_id] == (0, 0, 1, ["HoldPlaced", "HoldExpired"])
    # The unlapsed one is left alone by the release.
    await store.release_lapsed_holds(pool, 64)
    assert hold_rows(settings, [kept.transfer.transfer_id])[kept.transfer.transfer_id][0] == "PENDING"
    holds_invariants(settings, [payer.account_id, payee.account_id])


async def test_concurrent_releases_release_each_lapsed_hold_once(
        bank: Bank, pool: AsyncConnectionPool, settings: Settings) -> None:
    """Two workers (and svc_transfer's own) race for the same lapsed holds: SKIP LOCKED gives each
    hold to one of them; each is released once, with one HoldExpired."""
    payer, payee = await bank.open_account(), await bank.open_account()
    await bank.deposit(payer, 1000)
    placed = await store.move_money_batch(pool, [hold(payer, payee, 10) for _ in range(40)])
    ids = [m.transfer.transfer_id for m in placed if m.transfer is not None]
    assert len(ids) == 40 and age_holds(settings, ids, 3600) == 40
    released: list[store.Movement] = []
    for _ in range(50):
        for results in await asyncio.gather(store.release_lapsed_holds(pool, 8), store.release_lapsed_holds(pool, 8)):
            released += [r for r in results if r.transfer is not None and r.transfer.transfer_id in ids]
        if all(row[0] == "EXPIRED" for row in hold_rows(settings, ids).values()):
            break
    assert all(row == ("EXPIRED", 10, 10, True) for row in hold_rows(settings, ids).values())
    released_ids = [r.transfer.transfer_id for r in released if r.transfer is not None]
    assert len(released_ids) == len(set(released_ids)) and all(r.error is None for r in released)
    assert all(rows[3] == ["HoldPlaced", "HoldExpired"] for rows in written_rows(settings, ids).values())
    assert pending(settings, payer, payee) == [(0, 0), (0, 0)]
    holds_invariants(settings, [payer.account_id, payee.account_id])


async def test_an_account_with_a_pending_hold_on_either_side_cannot_close(
        bank: Bank, pool: AsyncConnectionPool, settings: Settings) -> None:
    ledger = store.LedgerStore(pool)
    payer, payee = await bank.open_account(), await bank.open_account()
    await bank.deposit(payer, 100)
    placed = await store.move_money_batch(pool, [hold(payer, payee, 60), hold(payer, payee, 40)])
    first, second = [m.transfer.transfer_id for m in placed if m.transfer is not None]
    frozen = await ledger.set_ledger_account_status(payer.account_id, "FROZEN")
    assert frozen.account is not None
    assert (frozen.account.balance, frozen.account.pending_debits, frozen.account.available_balance) == (100, 100, 0)
    assert (await ledger.set_ledger_account_status(payer.account_id, "ACTIVE")).error is None
    # The payee's balance is 0, but a hold names it.
    assert (await ledger.set_ledger_account_status(payee.account_id, "CLOSED")).error == "ACCOUNT_NOT_EMPTY"
    assert (await ledger.set_ledger_account_status(payer.account_id, "CLOSED")).error == "ACCOUNT_NOT_EMPTY"
    await store.move_money_batch(pool, [settle("VOID", payee, first)])
    assert (await ledger.set_ledger_account_status(payee.account_id, "CLOSED")).error == "ACCOUNT_NOT_EMPTY"
    await store.move_money_batch(pool, [settle("VOID", payee, second)])
    closed = await ledger.set_ledger_account_status(payee.account_id, "CLOSED")
    assert closed.error is None and closed.account is not None and closed.account.status == "CLOSED"
    await bank.withdraw(payer, 100)
    assert (await ledger.set_ledger_account_status(payer.account_id, "CLOSED")).error is None
    holds_invariants(settings, [payer.account_id, payee.account_id])


async def test_pending_debits_are_the_sum_of_pending_holds(
        bank: Bank, pool: AsyncConnectionPool, settings: Settings) -> None:
    """Holds placed, posted, voided and expired in every mix, over a few accounts both ways: after
    each batch the counters equal the sums of the PENDING holds, and the whole ledger's invariants hold."""
    accounts = [await bank.open_account() for _ in range(4)]
    for account in accounts:
        await bank.deposit(account, 1000)
    ids = [a.account_id for a in accounts]
    open_holds: list[tuple[str, Account]] = []
    for round_number in range(6):
        # Each account pays another (offset 1 to 3), both ways across the rounds.
        batch = [hold(accounts[i], accounts[(i + 1 + round_number % 3) % 4], 37 + i * 11 + round_number)
                 for i in range(4)]
        settling = open_holds[:3]
        batch += [settle(kind, payee, hold_id, amount) for (hold_id, payee), (kind, amount) in
                  zip(settling, [("POST", None), ("POST", 5), ("VOID", None)], strict=False)]
        results = await store.move_money_batch(pool, batch)
        assert all(r.error is None for r in results), [r.error for r in results]
        open_holds = open_holds[3:] + [(r.transfer.transfer_id, payee_of(accounts, r.transfer.to_account_id))
                                       for r in results[:4] if r.transfer is not None]
        if round_number == 3:
            age_holds(settings, [hold_id for hold_id, _ in open_holds[:2]], 3600)
            await release_until_settled(pool, settings, [hold_id for hold_id, _ in open_holds[:2]])
            open_holds = open_holds[2:]
        holds_invariants(settings, ids)
        state = await store.LedgerStore(pool).customer_accounts(ids)
        held = sql(settings, "SELECT from_account_id::text, sum(held_amount) FROM transfer.transfers"
                             " WHERE status = 'PENDING' AND from_account_id = ANY(%s::uuid[]) GROUP BY 1", (ids,))
        assert {a: state[a].pending_debits for a in ids} == {a: dict(held).get(a, 0) for a in ids}
    holds_invariants(settings)


def payee_of(accounts: list[Account], account_id: str) -> Account:
    [account] = [a for a in accounts if a.account_id == account_id]
    return account

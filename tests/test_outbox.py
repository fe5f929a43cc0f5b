"""The outbox relay survives a Kafka restart: events committed while the broker is down are
published once it is back, none lost, in order per key. And a batch Kafka acknowledged whose
mark was lost (the relay's Postgres connection killed before its commit) is not published again:
each event is in Kafka exactly once."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import murmur2
from prometheus_client import REGISTRY
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from common import db, outbox
from common.config import Settings
from common.events import CUSTOMER_TOPIC
from devstack.stack import Stack
from tests.events_support import read_topic, topic_ends
from tests.support import rest, unique_email, until

KEYS = 5
EVENTS_PER_KEY = 20
assert KEYS * EVENTS_PER_KEY <= outbox.BATCH_SIZE  # the fault tests lose the mark of one whole batch

Send = Callable[[AIOKafkaProducer, Sequence[tuple[Any, ...]], dict[str, bytes]], Awaitable[list[asyncio.Future[Any]]]]


def _unsent(settings: Settings, keys: list[str], schema: str = "customer") -> int:
    with psycopg.connect(settings.pg_conninfo) as conn:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}.outbox WHERE sent_time IS NULL AND aggregate_id = ANY(%s)")
                           .format(sql.Identifier(schema)), (keys,)).fetchone()
    return int(row[0]) if row else 0


async def test_relay_survives_a_broker_restart_without_loss_or_reordering(stack: Stack, settings: Settings) -> None:
    keys = [f"order-test-{uuid.uuid4().hex[:8]}" for _ in range(KEYS)]
    since = await topic_ends(settings, CUSTOMER_TOPIC)
    stack.down(["kafka"], out=sys.stderr)
    try:
        # Committed while Kafka is down: real registrations and, interleaved, numbered events
        # of a test type (consumers skip unknown types) so the order per key can be checked.
        emails = [unique_email("outage") for _ in range(3)]
        for email in emails:
            response = await asyncio.to_thread(rest, settings, "POST", "/v1/customers",
                                               {"email": email, "full_name": "Outage"})
            assert response.status == 200, response.body
        with psycopg.connect(settings.pg_conninfo) as conn:
            for seq in range(EVENTS_PER_KEY):
                for key in keys:
                    conn.execute(
                        "INSERT INTO customer.outbox (event_id, topic, aggregate_id, event_type, payload)"
                        " VALUES (%s, %s, %s, 'test.Sequence', %s)",
                        (uuid.uuid4(), CUSTOMER_TOPIC, key, str(seq).encode()),
                    )
        await asyncio.sleep(2)
        assert _unsent(settings, keys) == KEYS * EVENTS_PER_KEY  # nothing marked sent without a broker
    finally:
        await stack.up(["kafka"], out=sys.stderr)

    await asyncio.to_thread(until, lambda: _unsent(settings, keys) == 0 or None,
                            "the relay did not catch up after the broker came back", 60.0, 0.5)

    for key, sequence in (await _read_sequences(settings, keys, since)).items():
        # At least once: a retried batch may deliver a prefix again, but first deliveries are
        # complete and in order.
        first_deliveries = [n for i, n in enumerate(sequence) if n not in sequence[:i]]
        assert first_deliveries == list(range(EVENTS_PER_KEY)), (key, sequence)


async def _read_records(settings: Settings, keys: list[str], since: dict[TopicPartition, int],
                        ) -> dict[str, list[tuple[int, str]]]:
    """(number, event_id) of the test.Sequence events of these keys on the customer topic, from
    `since` to the end, in log order per key."""
    seen: dict[str, list[tuple[int, str]]] = {key: [] for key in keys}
    for record in await read_topic(settings, CUSTOMER_TOPIC, since):
        key = (record.key or b"").decode()
        if key in seen:
            number = int((record.value or b"-1").split(b" ")[0])
            seen[key].append((number, outbox.decode_headers(record.headers)["event_id"]))
    return seen


async def _read_sequences(settings: Settings, keys: list[str], since: dict[TopicPartition, int],
                          ) -> dict[str, list[int]]:
    """The numbers of the test.Sequence events of these keys, in log order per key."""
    return {key: [number for number, _ in records]
            for key, records in (await _read_records(settings, keys, since)).items()}


async def test_a_batch_larger_than_a_record_batch_keeps_each_keys_order(stack: Stack, settings: Settings) -> None:
    """The relay packs a batch into record batches per partition; 2 KB events overflow one
    (16 KiB), so a partition gets several, which must keep the order of the outbox."""
    keys = [f"pack-test-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    events = 40
    since = await topic_ends(settings, CUSTOMER_TOPIC)
    with psycopg.connect(settings.pg_conninfo) as conn, conn.transaction():
        for seq in range(events):
            for key in keys:
                conn.execute(
                    "INSERT INTO customer.outbox (event_id, topic, aggregate_id, event_type, payload)"
                    " VALUES (%s, %s, %s, 'test.Sequence', %s)",
                    (uuid.uuid4(), CUSTOMER_TOPIC, key, f"{seq} ".encode() + b"x" * 2048),
                )
    await asyncio.to_thread(until, lambda: _unsent(settings, keys) == 0 or None, "the relay did not publish the batch",
                            60.0, 0.5)
    seen = await _read_sequences(settings, keys, since)
    assert seen == {key: list(range(events)) for key in keys}  # no fault: each once, in order


def test_murmur2_is_kafkas() -> None:
    """The relay's partition of a key is the one Kafka's default partitioner gives it."""
    keys = [str(uuid.uuid4()).encode() for _ in range(500)] + [bytes(range(n)) for n in range(70)]
    assert [outbox.murmur2(key) for key in keys] == [murmur2(key) for key in keys]
    # Kafka's own vectors (UtilsTest.testMurmur2), as signed 32-bit ints.
    for key, java in ((b"21", -973932308), (b"foobar", -790332482), (b"a-little-bit-long-string", -985981536)):
        assert outbox.murmur2(key) == java & 0xFFFFFFFF


async def test_sent_events_are_deleted_after_the_retention_and_unsent_ones_never(stack: Stack,
                                                                                 settings: Settings) -> None:
    """The outbox stays bounded: rows sent longer ago than the retention go; rows sent recently
    and rows not sent yet (however old) stay. Run in a transaction that is rolled back, so the
    running relay never sees these rows."""
    async with await psycopg.AsyncConnection.connect(db.conninfo(settings, "customer")) as conn:
        rows = {}
        for name, sent in (("old-sent", "now() - interval '2 days'"), ("recent-sent", "now() - interval '1 hour'"),
                           ("old-unsent", "NULL")):
            cursor = await conn.execute(
                "INSERT INTO outbox (event_id, topic, aggregate_id, event_type, payload, create_time, sent_time)"
                f" VALUES (gen_random_uuid(), 'bank.customer.v1', %s, 'test', '', now() - interval '2 days', {sent})"
                " RETURNING outbox_id", (f"cleanup-{name}",))
            row = await cursor.fetchone()
            assert row is not None
            rows[name] = row[0]
        deleted = await outbox.delete_sent(conn, retention_s=24 * 3600, batch=10**9)
        cursor = await conn.execute("SELECT outbox_id FROM outbox WHERE outbox_id = ANY(%s)", (list(rows.values()),))
        left = {row[0] for row in await cursor.fetchall()}
        await conn.rollback()
    assert deleted >= 1
    assert left == {rows["recent-sent"], rows["old-unsent"]}


@contextlib.asynccontextmanager
async def _own_outbox(settings: Settings) -> AsyncIterator[tuple[str, AsyncConnectionPool]]:
    """A schema of its own with an outbox like the customer one, and a pool on it: a relay
    started on it is the only one, and the services' relays never see its rows."""
    schema = f"outbox_test_{uuid.uuid4().hex[:8]}"
    async with await psycopg.AsyncConnection.connect(settings.pg_conninfo, autocommit=True) as conn:
        await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        await conn.execute(sql.SQL("CREATE TABLE {}.outbox (LIKE customer.outbox INCLUDING ALL)")
                           .format(sql.Identifier(schema)))
    pool = await db.open_pool(settings, schema)
    try:
        yield schema, pool
    finally:
        await pool.close()
        async with await psycopg.AsyncConnection.connect(settings.pg_conninfo, autocommit=True) as conn:
            await conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


async def _write_sequences(pool: AsyncConnectionPool, keys: list[str]) -> None:
    """EVENTS_PER_KEY numbered test.Sequence events per key, committed together."""
    async with pool.connection() as conn, conn.transaction():
        for seq in range(EVENTS_PER_KEY):
            for key in keys:
                await conn.execute(
                    "INSERT INTO outbox (event_id, topic, aggregate_id, event_type, payload)"
                    " VALUES (%s, %s, %s, 'test.Sequence', %s)",
                    (uuid.uuid4(), CUSTOMER_TOPIC, key, str(seq).encode()))


async def _relay_once(settings: Settings, schema: str, pool: AsyncConnectionPool, keys: list[str]) -> None:
    """A relay on this outbox until it marked every event of these keys sent."""
    relay = outbox.OutboxRelay(settings, pool, schema)
    await relay.start()
    try:
        await asyncio.to_thread(until, lambda: _unsent(settings, keys, schema) == 0 or None,
                                "the relay did not mark every event sent", 60.0, 0.2)
    finally:
        await relay.stop()


def _losing_the_mark(settings: Settings, schema: str, terminated: list[int]) -> Send:
    """outbox._send, then, the first time, once Kafka acknowledged the batch: the relay's
    transaction (the one backend of this schema idle in a transaction: the leader connection is
    autocommit) terminated before it can mark the batch sent, as a failover or a SIGKILL does."""
    send = outbox._send

    async def send_and_lose_the_mark(producer: AIOKafkaProducer, rows: Sequence[tuple[Any, ...]],
                                     built: dict[str, bytes]) -> list[asyncio.Future[Any]]:
        futures = await send(producer, rows, built)
        if not terminated:
            await asyncio.gather(*futures)
            async with await psycopg.AsyncConnection.connect(settings.pg_conninfo, autocommit=True) as admin:
                cursor = await admin.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s"
                                             " AND state = 'idle in transaction'", (f"svc_{schema}",))
                pids = [row[0] for row in await cursor.fetchall()]
                assert len(pids) == 1, pids
                # With a timeout, pg_terminate_backend returns once the backend is gone.
                cursor = await admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pids[0],))
                row = await cursor.fetchone()
                assert row is not None and row[0], "the relay's backend outlived pg_terminate_backend"
            terminated.append(pids[0])
        return futures

    return send_and_lose_the_mark


def _reconciled() -> float:
    return REGISTRY.get_sample_value("outbox_reconciled_total", {"topic": CUSTOMER_TOPIC}) or 0.0


def _capped() -> float:
    return REGISTRY.get_sample_value("outbox_reconcile_capped_total", {"topic": CUSTOMER_TOPIC}) or 0.0


async def test_a_batch_whose_mark_was_lost_is_in_kafka_exactly_once(stack: Stack, settings: Settings,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Kafka acknowledged the batch, then the relay's Postgres connection was killed before the
    sent mark committed: the next relay finds the events in Kafka, marks them sent and publishes
    none again."""
    keys = [f"lost-mark-{uuid.uuid4().hex[:8]}" for _ in range(KEYS)]
    terminated: list[int] = []
    reconciled = _reconciled()
    since = await topic_ends(settings, CUSTOMER_TOPIC)
    async with _own_outbox(settings) as (schema, pool):
        await _write_sequences(pool, keys)
        monkeypatch.setattr(outbox, "_send", _losing_the_mark(settings, schema, terminated))
        await _relay_once(settings, schema, pool, keys)
    assert terminated, "the fault was not injected"
    # The lost mark was found by the reconcile (not, say, committed before the kill went through).
    assert _reconciled() - reconciled == KEYS * EVENTS_PER_KEY
    records = await _read_records(settings, keys, since)
    copies = collections.Counter(event_id for key_records in records.values() for _, event_id in key_records)
    assert len(copies) == KEYS * EVENTS_PER_KEY and set(copies.values()) == {1}, copies
    assert {key: [n for n, _ in key_records] for key, key_records in records.items()} == \
        {key: list(range(EVENTS_PER_KEY)) for key in keys}


async def test_a_relay_without_a_fault_publishes_each_event_once_in_order(stack: Stack, settings: Settings) -> None:
    """The plain path, with the reconcile of a relay that starts with unsent rows none of which
    is in Kafka: each event once, in order per key, none marked sent by the reconcile."""
    keys = [f"plain-{uuid.uuid4().hex[:8]}" for _ in range(KEYS)]
    reconciled = _reconciled()
    since = await topic_ends(settings, CUSTOMER_TOPIC)
    async with _own_outbox(settings) as (schema, pool):
        await _write_sequences(pool, keys)
        await _relay_once(settings, schema, pool, keys)
    assert _reconciled() == reconciled
    assert await _read_sequences(settings, keys, since) == {key: list(range(EVENTS_PER_KEY)) for key in keys}


async def test_a_lost_mark_past_the_reconcile_cap_is_published_again_in_order(
        stack: Stack, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reconcile reads at most RECONCILE_RECORDS_MAX records per partition: with a cap below
    the batch, the events before it are published again (at least once, as without the
    reconcile), which is counted, and first deliveries stay complete and in order per key."""
    keys = [f"capped-{uuid.uuid4().hex[:8]}" for _ in range(KEYS)]
    terminated: list[int] = []
    capped = _capped()
    since = await topic_ends(settings, CUSTOMER_TOPIC)
    monkeypatch.setattr(outbox, "RECONCILE_RECORDS_MAX", EVENTS_PER_KEY // 2)
    async with _own_outbox(settings) as (schema, pool):
        await _write_sequences(pool, keys)
        monkeypatch.setattr(outbox, "_send", _losing_the_mark(settings, schema, terminated))
        await _relay_once(settings, schema, pool, keys)
    assert terminated, "the fault was not injected"
    assert _capped() > capped
    records = await _read_records(settings, keys, since)
    copies = collections.Counter(event_id for key_records in records.values() for _, event_id in key_records)
    assert len(copies) == KEYS * EVENTS_PER_KEY and max(copies.values()) == 2, copies
    for key, key_records in records.items():
        numbers = [n for n, _ in key_records]
        first_deliveries = [n for i, n in enumerate(numbers) if n not in numbers[:i]]
        assert first_deliveries == list(range(EVENTS_PER_KEY)), (key, numbers)

"""The outbox relay survives a Kafka restart: events committed while the broker is down are
published once it is back, none lost, in order per key."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid

import psycopg
from aiokafka import AIOKafkaConsumer
from aiokafka.partitioner import murmur2

from common import db, outbox
from common.config import Settings
from common.events import CUSTOMER_TOPIC
from devstack.stack import Stack
from tests.support import rest, unique_email, until

KEYS = 5
EVENTS_PER_KEY = 20


def _unsent(settings: Settings, keys: list[str]) -> int:
    with psycopg.connect(settings.pg_conninfo) as conn:
        row = conn.execute("SELECT count(*) FROM customer.outbox WHERE sent_time IS NULL AND aggregate_id = ANY(%s)",
                           (keys,)).fetchone()
    return int(row[0]) if row else 0


async def test_relay_survives_a_broker_restart_without_loss_or_reordering(stack: Stack, settings: Settings) -> None:
    keys = [f"order-test-{uuid.uuid4().hex[:8]}" for _ in range(KEYS)]
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

    for key, sequence in (await _read_sequences(settings, keys)).items():
        # At least once: a retried batch may deliver a prefix again, but first deliveries are
        # complete and in order.
        first_deliveries = [n for i, n in enumerate(sequence) if n not in sequence[:i]]
        assert first_deliveries == list(range(EVENTS_PER_KEY)), (key, sequence)


async def _read_sequences(settings: Settings, keys: list[str], expected: int = KEYS * EVENTS_PER_KEY,
                          ) -> dict[str, list[int]]:
    """The numbered test.Sequence events of these keys on the customer topic, in log order per key."""
    consumer = AIOKafkaConsumer(CUSTOMER_TOPIC, bootstrap_servers=settings.kafka_bootstrap,
                                group_id=f"test-{uuid.uuid4().hex}", auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    seen: dict[str, list[int]] = {key: [] for key in keys}
    try:
        deadline = time.monotonic() + 30
        while sum(len(v) for v in seen.values()) < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=1000, max_records=2000)
            for records in batch.values():
                for record in records:
                    key = (record.key or b"").decode()
                    if key in seen:
                        seen[key].append(int((record.value or b"-1").split(b" ")[0]))
    finally:
        await consumer.stop()
    return seen


async def test_a_batch_larger_than_a_record_batch_keeps_each_keys_order(stack: Stack, settings: Settings) -> None:
    """The relay packs a batch into record batches per partition; 2 KB events overflow one
    (16 KiB), so a partition gets several, which must keep the order of the outbox."""
    keys = [f"pack-test-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    events = 40
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
    seen = await _read_sequences(settings, keys, len(keys) * events)
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

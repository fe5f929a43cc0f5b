"""The transactional outbox relay, run inside every service that publishes events.

Rows committed to <schema>.outbox are published to Kafka by an idempotent producer (acks=all,
keyed by aggregate id) and marked sent only after the broker acknowledged them, in bounded
batches, oldest first. One relay per schema is active at a time (a Postgres advisory lock held
on a dedicated connection), so a second process of the same service cannot publish a later
event of a key before an earlier one. When Kafka is down the batch is not marked, and the
relay retries with bounded backoff: events are never lost or reordered per key, and are
published once but in the rare windows listed below (at least once there; consumers drop
duplicates by event_id).

Exactly once in Kafka when a mark is lost. A batch Kafka acknowledged whose mark never commits
(the relay's process killed, its Postgres connection lost in a failover) would be published
again by the next relay. So a relay, each time it becomes active (at start and after every
error) and before it publishes anything, reconciles: it locks the RECONCILE_ROWS oldest unsent
rows, reads back the Kafka partitions their keys map to, from RECONCILE_MARGIN_S before the
oldest row's create_time up to the end offsets taken then, and marks sent, without publishing
them again, the rows whose event_id header it found there. A lost mark's rows are always among
those read: only the active relay publishes, one batch at a time, and every relay reconciles
before its first batch, so at most one batch is in Kafka unmarked, made of the oldest unsent
rows, at the tail of its partitions. The read is bounded by that: at most
RECONCILE_RECORDS_MAX records per partition, the newest. When the cap cut a partition's window
short and the oldest record read there is one of these rows' events, earlier ones may lie before
it: that is logged and counted (outbox_reconcile_capped_total), and what was not found is
published again, as before (at least once; consumers drop duplicates by event_id). The order per key holds: the idempotent
producer lands a key's records in order, so what is found of a key is a prefix of its unsent
rows (past the cap, a key's earlier events come again after its later ones, as duplicates:
first deliveries stay in order). Why not Kafka transactions:
docs/decisions/0023-outbox-exactly-once-by-reading-back.md.

Windows left, each a second fault on top of the first (a duplicate, never a loss):
- A record still on its way from another producer when the end offsets are read is missed.
  A relay that stops stops its producer, which returns once every record it took is delivered
  or has failed, before it lets go of the leader lock; on a failed send, before it lets go of
  the batch's row locks too, which a relay reconciling elsewhere waits for (a relay that lost
  only its leader connection). A killed process's requests reached the broker before its
  sockets closed or never will, and a healthy broker appends them within milliseconds, while
  the next relay takes about a second to become active (its lock poll, producer start; after a
  failover, Patroni's seconds first). Only a broker stalled that long lets one through.
- With a replication factor above one, a record appended but not yet replicated is past the
  end offset (the high watermark) that bounds the read.
- Events past the cap (above).

Costs per batch: one SELECT … FOR UPDATE, one Kafka round trip (all records of the batch in
flight together), one UPDATE; an idle relay wakes on a NOTIFY sent after commits (OutboxNudge),
with a poll as a fallback, and a busy one polls every BUSY_POLL_S. The reconcile costs nothing
per batch: once per activation, a SELECT, a short-lived consumer (a few requests) and at most
RECONCILE_RECORDS_MAX records per partition read, none of it when no row is unsent.

Sent rows are kept SENT_RETENTION_S (the table still shows yesterday's events; Kafka keeps the
events themselves), then deleted by the active relay when it is not busy: the table stays
bounded by the traffic of that window instead of growing for ever.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from prometheus_client import Counter, Gauge
from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool

from common import db
from common import logging as common_logging
from common.config import Settings
from common.events import TOPICS
from common.retry import Backoff

log = logging.getLogger("outbox")

BATCH_SIZE = 200
POLL_INTERVAL_S = 1.0
# While events keep coming the relay polls at this interval instead of waiting for a NOTIFY, and
# keeps doing so BUSY_TAIL_S after the last batch that had events; OutboxNudge sends at most
# one NOTIFY per OutboxNudge.QUIET_S, which must stay below the tail (asserted there).
BUSY_POLL_S = 0.02
BUSY_TAIL_S = 1.0
RESTARTS = Backoff(tries=1, initial_s=0.2, max_s=5.0)  # pauses before the relay starts again
SEND_TIMEOUT_S = 30.0
SENT_RETENTION_S = 24 * 3600
CLEANUP_INTERVAL_S = 60.0
# Rows looked at per cleanup pass: the oldest ones (outbox_id is commit order, so rows old enough
# to go are among them); a pass that deleted this many runs again at the next quiet moment.
CLEANUP_BATCH = 10_000
# The reconcile when a relay becomes active (see the module's docstring). A lost mark is at most
# one batch; the slack covers rows committed late under a lower outbox_id (a long transaction)
# and records of other writers of the topic (a dead-letter replay) among the batch's.
RECONCILE_ROWS = 4 * BATCH_SIZE
RECONCILE_RECORDS_MAX = 4 * BATCH_SIZE  # per partition, the newest
# Record timestamps are the relay's clock, create_time the database's: the skew they may have.
RECONCILE_MARGIN_S = 60.0
RECONCILE_TIMEOUT_S = 30.0
RECONCILE_IDLE_POLLS_MAX = 5  # empty polls (1 s each) in a row before the read-back gives up

PUBLISHED = Counter("outbox_published_total", "Outbox events published to Kafka", ["topic"])
BACKLOG = Gauge("outbox_backlog", "Outbox events not yet published (seen by the active relay)")
OLDEST_AGE = Gauge("outbox_oldest_unsent_age_seconds", "Age of the oldest unpublished outbox event")
RECONCILED = Counter("outbox_reconciled_total",
                     "Unsent outbox events found already in Kafka by a relay becoming active, marked sent"
                     " without publishing them again", ["topic"])
RECONCILE_CAPPED = Counter("outbox_reconcile_capped_total",
                           "Partitions whose read-back hit RECONCILE_RECORDS_MAX with events of unsent rows"
                           " possibly before it (those are published again)", ["topic"])


async def ensure_topics(settings: Settings) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        for topic, partitions in TOPICS.items():
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([NewTopic(topic, num_partitions=partitions,
                                                     replication_factor=settings.kafka_replication_factor)])
    finally:
        await admin.close()


async def delete_sent(conn: AsyncConnection, retention_s: float = SENT_RETENTION_S,
                      batch: int = CLEANUP_BATCH) -> int:
    """Delete the rows sent more than retention_s ago among the `batch` oldest rows of this
    schema's outbox; unsent rows always stay. Returns how many went."""
    cursor = await conn.execute(
        "DELETE FROM outbox WHERE outbox_id IN (SELECT outbox_id FROM outbox ORDER BY outbox_id LIMIT %s)"
        " AND sent_time < now() - make_interval(secs => %s)",
        (batch, retention_s),
    )
    return cursor.rowcount


# Builds the bytes of the rows stored without a payload (event ids in, payload by event id out),
# inside the relay's transaction: a writer that keeps event encoding out of its lock window.
PayloadBuilder = Callable[[AsyncConnection, Sequence[str]], Awaitable[dict[str, bytes]]]


class OutboxRelay:
    def __init__(self, settings: Settings, pool: AsyncConnectionPool, schema: str,
                 build_payloads: PayloadBuilder | None = None) -> None:
        self._settings = settings
        self._pool = pool
        self._schema = schema
        self._build_payloads = build_payloads
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._next_cleanup = 0.0  # time.monotonic() of the next cleanup pass

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"outbox-relay-{self._schema}")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        # Runs until stop(): a supervisor, so it never gives up; each restart waits longer, up to
        # RESTARTS.max_s, and a clean run resets the count.
        failures = 0
        while not self._stopping:
            try:
                await self._lead_and_relay()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker or database down: retry, bounded backoff
                failures += 1
                pause_s = RESTARTS.delay_s(failures)
                log.warning("outbox relay interrupted; retrying", exc_info=exc,
                            extra=common_logging.fields(retry_in_s=round(pause_s, 3)))
                await asyncio.sleep(pause_s)
            else:
                failures = 0

    async def _lead_and_relay(self) -> None:
        # A dedicated connection (autocommit) holds the leader lock and listens for NOTIFY.
        conninfo = db.conninfo(self._settings, self._schema)
        async with await AsyncConnection.connect(conninfo, autocommit=True) as leader:
            # Until this process holds the leader lock, for as long as another one does: the
            # standby never ends by itself; stop() cancels it.
            while True:
                cursor = await leader.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (f"outbox:{self._schema}",))
                row = await cursor.fetchone()
                if row and row[0]:
                    break
                await asyncio.sleep(POLL_INTERVAL_S)  # another process of this service is the relay
            await leader.execute(sql.SQL("LISTEN {}").format(sql.Identifier(f"outbox_{self._schema}")))
            await ensure_topics(self._settings)
            producer = AIOKafkaProducer(
                bootstrap_servers=self._settings.kafka_bootstrap,
                acks="all",
                enable_idempotence=True,
                linger_ms=2,
                request_timeout_ms=int(SEND_TIMEOUT_S * 1000),
            )
            await producer.start()
            notifies = asyncio.get_running_loop().create_task(self._listen(leader))
            try:
                await self._reconcile(producer)  # before anything is published
                log.info("outbox relay active", extra=common_logging.fields(schema=self._schema))
                busy_until = 0.0
                while not self._stopping:  # until stop(), or an error for _run to restart from
                    published = await self._relay_batch(producer)
                    if published:
                        busy_until = time.monotonic() + BUSY_TAIL_S
                    if published < BATCH_SIZE:
                        await self._clean_up()
                        self._wake.clear()
                        busy = time.monotonic() < busy_until
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), timeout=BUSY_POLL_S if busy else POLL_INTERVAL_S)
                    if notifies.done():
                        notifies.result()  # the listening connection broke: raise, reconnect
            finally:
                notifies.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await notifies
                await producer.stop()

    async def _clean_up(self) -> None:
        """A cleanup pass when one is due; a failing one only waits for the next."""
        if time.monotonic() < self._next_cleanup:
            return
        self._next_cleanup = time.monotonic() + CLEANUP_INTERVAL_S
        try:
            async with self._pool.connection() as conn:
                deleted = await delete_sent(conn)
        except Exception as exc:  # the database is down: relaying reports it; the next pass retries
            log.warning("outbox cleanup failed", exc_info=exc)
            return
        if deleted:
            log.info("sent outbox events deleted", extra=common_logging.fields(schema=self._schema, deleted=deleted,
                                                                                retention_s=SENT_RETENTION_S))
        if deleted == CLEANUP_BATCH:
            self._next_cleanup = 0.0  # more to go: again at the next quiet moment

    async def _reconcile(self, producer: AIOKafkaProducer) -> None:
        """Mark sent the unsent rows whose events are in Kafka already: a batch published by a
        relay whose mark was lost (see the module's docstring)."""
        async with self._pool.connection() as conn, conn.transaction():
            # FOR UPDATE waits for the batch of a relay still running elsewhere (one that lost its
            # leader connection, not its batch's) to end; lock_timeout bounds the wait, and _run
            # tries again.
            cursor = await conn.execute(
                "SELECT outbox_id, event_id::text, topic, aggregate_id, create_time"
                " FROM outbox WHERE sent_time IS NULL ORDER BY outbox_id LIMIT %s FOR UPDATE",
                (RECONCILE_ROWS,),
            )
            rows = await cursor.fetchall()
            if not rows:
                return
            found = await asyncio.wait_for(_published(self._settings, producer, rows), timeout=RECONCILE_TIMEOUT_S)
            if not found:
                return
            await conn.execute("UPDATE outbox SET sent_time = now() WHERE outbox_id = ANY(%s)",
                               ([row[0] for row in rows if row[1] in found],))
        counts = collections.Counter(row[2] for row in rows if row[1] in found)
        for topic, count in counts.items():
            RECONCILED.labels(topic).inc(count)
        log.warning("outbox events found in Kafka already, marked sent without publishing them again",
                    extra=common_logging.fields(schema=self._schema, events=len(found), unsent=len(rows)))

    async def _listen(self, conn: AsyncConnection) -> None:
        async for _ in conn.notifies():
            self._wake.set()

    async def _relay_batch(self, producer: AIOKafkaProducer) -> int:
        async with self._pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "SELECT outbox_id, event_id::text, topic, aggregate_id, event_type, payload, headers, create_time"
                " FROM outbox WHERE sent_time IS NULL ORDER BY outbox_id LIMIT %s FOR UPDATE",
                (BATCH_SIZE,),
            )
            rows = await cursor.fetchall()
            if not rows:
                BACKLOG.set(0)
                OLDEST_AGE.set(0)
                return 0
            OLDEST_AGE.set(max(0.0, time.time() - rows[0][7].timestamp()))
            built: dict[str, bytes] = {}
            unbuilt = [row[1] for row in rows if not row[5]]
            if unbuilt:
                assert self._build_payloads is not None, f"{self._schema}.outbox rows without a payload"
                built = await self._build_payloads(conn, unbuilt)
                assert built.keys() == set(unbuilt), "an outbox event whose payload could not be built"
            # All records in flight together; the idempotent producer keeps their order per partition.
            try:
                await asyncio.wait_for(asyncio.gather(*await _send(producer, rows, built)), timeout=SEND_TIMEOUT_S)
            except BaseException:
                # Some records may still be on their way (the idempotent producer retries them
                # until the broker takes them): stopping the producer waits for each to land or
                # fail, and these rows stay locked until then, so a relay reconciling elsewhere,
                # which waits for their locks, finds in Kafka every record that got there.
                await producer.stop()
                raise
            await conn.execute("UPDATE outbox SET sent_time = now() WHERE outbox_id = ANY(%s)",
                               ([r[0] for r in rows],))
            for topic, count in collections.Counter(row[2] for row in rows).items():
                PUBLISHED.labels(topic).inc(count)
            # One line per event (a hop of a request followed by its request_id through the logs).
            common_logging.info_lines(log, "event published", [{
                "request_id": (headers or {}).get("request_id") or None, "event_id": event_id, "topic": topic,
                "event_type": event_type, "aggregate_id": aggregate_id}
                for _, event_id, topic, aggregate_id, event_type, _, headers, _ in rows])
            if len(rows) < BATCH_SIZE:
                BACKLOG.set(0)  # this batch took every unsent row it could see
            else:
                cursor = await conn.execute("SELECT count(*) FROM outbox WHERE sent_time IS NULL")
                backlog = await cursor.fetchone()
                BACKLOG.set(backlog[0] if backlog else 0)
            return len(rows)


_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 of a key, as its default partitioner (and aiokafka's) computes it, three
    times faster than aiokafka's byte-by-byte version (tests/test_outbox.py compares them)."""
    length = len(data)
    h = 0x9747B28C ^ length
    tail = length & ~3
    for (k,) in struct.iter_unpack("<I", data[:tail]):
        k = (k * _M) & _MASK
        k ^= k >> 24
        h = ((h * _M) & _MASK) ^ ((k * _M) & _MASK)
    extra = length & 3
    if extra >= 3:
        h ^= data[tail + 2] << 16
    if extra >= 2:
        h ^= data[tail + 1] << 8
    if extra >= 1:
        h ^= data[tail]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


def _partition(partitions: Sequence[int], key: bytes) -> int:
    """The partition the producer's default partitioner gives the key (murmur2, as Kafka's Java
    clients do), so a key keeps its partition whichever way it is sent."""
    return partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]


async def _published(settings: Settings, producer: AIOKafkaProducer,
                     rows: Sequence[tuple[Any, ...]]) -> set[str]:
    """The event ids of these unsent rows (outbox_id, event_id, topic, aggregate_id,
    create_time) found in Kafka: in the partitions their keys map to, from RECONCILE_MARGIN_S
    before their oldest create_time to the end offsets of now, at most the newest
    RECONCILE_RECORDS_MAX records of each partition."""
    wanted: dict[TopicPartition, set[str]] = {}
    since_ms: dict[TopicPartition, int] = {}
    partitions: dict[str, list[int]] = {}
    for _, event_id, topic, aggregate_id, create_time in rows:
        if topic not in partitions:
            partitions[topic] = sorted(await producer.partitions_for(topic))
        tp = TopicPartition(topic, _partition(partitions[topic], aggregate_id.encode()))
        wanted.setdefault(tp, set()).add(event_id)
        row_since_ms = int((create_time.timestamp() - RECONCILE_MARGIN_S) * 1000)
        since_ms[tp] = min(since_ms.get(tp, row_since_ms), row_since_ms)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=None,  # assigned partitions, no offsets committed
        enable_auto_commit=False,
        isolation_level="read_uncommitted",  # the relay writes no transactions
        auto_offset_reset="earliest",  # a start offset gone to retention meanwhile: what is left
        request_timeout_ms=int(RECONCILE_TIMEOUT_S * 1000),
    )
    await consumer.start()
    try:
        consumer.assign(list(wanted))
        ends = await consumer.end_offsets(list(wanted))
        beginnings = await consumer.beginning_offsets(list(wanted))
        by_time = await consumer.offsets_for_times(since_ms)
        truncated: set[TopicPartition] = set()  # the time window reaches before the cap
        reading: set[TopicPartition] = set()
        for tp in wanted:
            at_time = by_time[tp]
            since = at_time.offset if at_time is not None else ends[tp]  # None: no record that recent
            start = max(since, beginnings[tp], ends[tp] - RECONCILE_RECORDS_MAX)
            if ends[tp] - RECONCILE_RECORDS_MAX > max(since, beginnings[tp]):  # the cap, not retention, cut it
                truncated.add(tp)
            if start < ends[tp]:
                consumer.seek(tp, start)
                reading.add(tp)
        found: set[str] = set()
        first_read: set[TopicPartition] = set()
        # Bounded by the records between start and end, and by RECONCILE_IDLE_POLLS_MAX polls in a
        # row that bring nothing (a partition whose leader is away): then the relay starts again.
        idle_polls = 0
        while reading:
            batches = await consumer.getmany(*reading, timeout_ms=1000, max_records=RECONCILE_RECORDS_MAX)
            idle_polls = 0 if any(batches.values()) else idle_polls + 1
            if idle_polls >= RECONCILE_IDLE_POLLS_MAX:
                raise RuntimeError(f"outbox reconcile: no records from {sorted(map(str, reading))} "
                                   f"in {idle_polls} polls before their end offsets")
            for tp, records in batches.items():
                for record in records:
                    if record.offset >= ends[tp]:
                        break
                    event_id = decode_headers(record.headers).get("event_id", "")
                    if tp not in first_read:
                        first_read.add(tp)
                        if tp in truncated and event_id in wanted[tp]:
                            RECONCILE_CAPPED.labels(tp.topic).inc()
                            log.warning("outbox reconcile capped: events before it may be published again",
                                        extra=common_logging.fields(topic=tp.topic, partition=tp.partition,
                                                                    records_max=RECONCILE_RECORDS_MAX))
                    if event_id in wanted[tp]:
                        found.add(event_id)
            for tp in list(reading):
                if await consumer.position(tp) >= ends[tp]:
                    reading.discard(tp)
        return found
    finally:
        await consumer.stop()


async def _send(producer: AIOKafkaProducer, rows: Sequence[tuple[Any, ...]],
                built: dict[str, bytes]) -> list[asyncio.Future[Any]]:
    """Queue the records of these outbox rows, in order, as one record batch per partition (or
    more when one fills up) rather than one producer.send per record, which costs about ten times
    the CPU. Each record's partition is _partition's."""
    partitions: dict[str, list[int]] = {}
    builders: dict[tuple[str, int], Any] = {}
    full: list[tuple[Any, str, int]] = []
    for _, event_id, topic, aggregate_id, event_type, payload, headers, _ in rows:
        if topic not in partitions:
            partitions[topic] = sorted(await producer.partitions_for(topic))
        key = aggregate_id.encode()
        partition = _partition(partitions[topic], key)
        record_headers = [("event_type", event_type.encode()), ("event_id", event_id.encode())]
        record_headers += [(k, str(v).encode()) for k, v in (headers or {}).items() if v]
        value = bytes(payload) if payload else built[event_id]
        builder = builders.get((topic, partition))
        if builder is None:
            builder = builders[(topic, partition)] = producer.create_batch()
        if builder.append(timestamp=None, key=key, value=value, headers=record_headers) is None:
            full.append((builder, topic, partition))  # full: a fresh batch takes the record
            builder = builders[(topic, partition)] = producer.create_batch()
            assert builder.append(timestamp=None, key=key, value=value, headers=record_headers) is not None, \
                f"an outbox event larger than a record batch ({len(value)} bytes)"
    full += [(builder, topic, partition) for (topic, partition), builder in builders.items()]
    return [await producer.send_batch(builder, topic, partition=partition) for builder, topic, partition in full]


class OutboxNudge:
    """Wakes the active relay (in any process of the service) soon after a commit, without a
    NOTIFY inside the writer's transaction: Postgres serializes the commits of notifying
    transactions, which cut the ledger's ceiling from ~2,800 to ~1,000 movements/s. Instead,
    one NOTIFY in its own autocommit transaction covers every commit of a window (COALESCE_S),
    and none is sent within QUIET_S of the last one: the relay that NOTIFY woke found events
    and polls every BUSY_POLL_S for BUSY_TAIL_S after them. A committed event so waits about
    COALESCE_S or BUSY_POLL_S, not the relay's idle poll, and a busy ledger sends a few NOTIFYs
    a second instead of one per window (each cost ~0.7 ms of the process's CPU)."""

    COALESCE_S = 0.02
    QUIET_S = 0.25

    def __init__(self, pool: AsyncConnectionPool, schema: str) -> None:
        assert self.QUIET_S + self.COALESCE_S < BUSY_TAIL_S, "a commit in the quiet time would wait for the idle poll"
        self._pool = pool
        self._channel = f"outbox_{schema}"
        self._pending: asyncio.Task[None] | None = None
        self._last_sent = -self.QUIET_S  # time.monotonic() of the last NOTIFY

    def __call__(self) -> None:
        if self._pending is not None and not self._pending.done():
            return  # the NOTIFY on its way is sent after this commit
        if time.monotonic() - self._last_sent < self.QUIET_S:
            return  # the relay is polling: the last NOTIFY woke it to events
        self._pending = asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        await asyncio.sleep(self.COALESCE_S)
        self._last_sent = time.monotonic()
        try:
            async with self._pool.connection() as conn:
                await conn.set_autocommit(True)
                await conn.execute("SELECT pg_notify(%s, '')", (self._channel,))
        except Exception as exc:  # the relay's poll is the fallback; never fail a movement for this
            log.debug("outbox nudge failed", exc_info=exc)


def decode_headers(raw: Sequence[tuple[str, bytes | None]] | None) -> dict[str, str]:
    """A Kafka record's headers as text (what consumers of outbox events read)."""
    return {key: value.decode("utf-8", "replace") for key, value in (raw or ()) if value is not None}


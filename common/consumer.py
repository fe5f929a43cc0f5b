"""The one Kafka consumer of outbox events, shared by every service that reacts to them.

- A group consumer; offsets are committed by hand and only for records whose work is done, so a
  crash or a rebalance redelivers, never skips (duplicates are the handlers' to drop, by
  event_id or by an idempotent write).
- Each poll takes a bounded batch; each partition of it is worked through in order (one key's
  events stay in order), partitions side by side. A consumer whose handlers are order-free
  (idempotent upserts of independent rows: the statements) may say `ordered=False`, and then
  all records of a batch are worked on together.
- Records are routed by their `event_type` header to a handler; a type without a route is not
  this consumer's business and is committed past.
- A record that can never be handled (bad bytes, a bad field: BadEvent), or whose handler
  keeps raising an unexpected error after HANDLER_BACKOFF.tries tries, goes to the dead-letter topic
  "<topic>.dlq" with the error in a header (see common/dlq.py to list and replay), then is
  committed past: one poisoned record never blocks its partition.
- When storage is down after the handler's own bounded retries (StorageUnavailable), nothing
  past that record is committed: its partition is rewound to it and the consumer pauses with a
  bounded, growing backoff before polling again.
- A batch has a deadline so the consumer polls often enough to stay in the group, whatever
  the dependencies do (checked against the handlers' worst case at construction).
- On the local stack a service's consumer is a static member of its group (`member_name`: the
  group, the host and the process index; BANK_CONSUMER_STATIC_MEMBER, set by the launcher), so a
  process that crashed and started again takes its own place at once, with its partitions,
  instead of waiting for the dead member to be given up: the session timeout, or, when the
  broker itself restarted meanwhile, the whole rebalance timeout (seen: 600 s without emails).
  The price: a static member does not leave the group when it stops, so a process stopped for
  good hands its partitions on only after the session timeout. Two live processes must never
  share a name: the newer takes the older's partitions with no rebalance, while the older may
  still be working its batch. Anything else (a process started by hand, a test, containers
  whose host name changes when they are replaced) joins as a dynamic member (docs/decisions/0020).
- A rebalance waits for the batch in hand: the member does not give up its partitions before
  that batch is done and committed (aiokafka awaits on_partitions_revoked before it rejoins), so
  the next owner starts after this member's work and two members never work the same records
  at once (svc_notify's claim would then see PENDING and send an email twice). A batch fetched
  while a rebalance began is not worked on: it is read again by whoever owns it next.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError
from google.protobuf.message import DecodeError, Message
from prometheus_client import Counter, Gauge, Histogram

from common import tracing
from common.config import Settings
from common.events import dlq_topic
from common.logging import fields, request_id_var
from common.outbox import decode_headers, ensure_topics
from common.retry import Backoff, retry

log = logging.getLogger("consumer")

BATCH_MAX_RECORDS = 50
BATCH_MAX_RECORDS_LIMIT = 1000  # also the most records an unordered consumer has in hand at once
POLL_TIMEOUT_MS = 1000
BATCH_DEADLINE_S = 30.0  # no new record of a batch is started after this; the rest is fetched again
POLL_INTERVAL_MS_MAX = 600_000
# How long a rebalance waits for a live member to rejoin (a dead one drops out after the session
# timeout): a member rejoins at its next poll, so the same bound as the poll interval.
REBALANCE_TIMEOUT_MS = POLL_INTERVAL_MS_MAX
SESSION_TIMEOUT_MS = 10_000
HEARTBEAT_INTERVAL_MS = 3_000
REQUEST_TIMEOUT_MS = 30_000
STOP_GRACE_S = 8.0  # the record in hand gets this long to finish on shutdown
# Pauses before reading again after storage was down, and before restarting after a failure.
PAUSES = Backoff(tries=1, initial_s=0.5, max_s=30.0)
# An unexpected error (a bug, or an error nobody classified) gets this many tries, then the
# record is dead-lettered rather than blocking its partition for ever.
HANDLER_BACKOFF = Backoff(tries=3, initial_s=0.5, max_s=1.0)
DLQ_SEND_TIMEOUT_S = 30.0
DLQ_ERROR_MAX_CHARS = 1000

# Headers a dead-lettered record carries besides its original ones.
DLQ_HEADER_ERROR = "dlq_error"
DLQ_HEADER_GROUP = "dlq_group"
DLQ_HEADER_SOURCE = "dlq_source"  # "<topic>/<partition>/<offset>"
DLQ_HEADER_TIME = "dlq_time"

EVENTS = Counter("consumer_events_total", "Events consumed, by group, type and outcome",
                 ["group", "event_type", "outcome"])
# From an event's create_time (a MoneyMoved's: the ledger's commit) to the end of its handling:
# commit -> statement line, commit -> emails accepted by the mail server. Buckets end at the
# bounds the sustained benchmark judges by (1 s for statements, 5 s for emails).
EVENT_AGE = Histogram("consumer_event_age_seconds", "Time from an event's create_time to the end of its handling, "
                      "by group and type", ["group", "event_type"],
                      buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0))
LAG = Gauge("consumer_lag_records", "Records of a partition this process has not handled yet: the partition's end "
            "offset (last stable offset, read_committed) minus the consumer's position, after each poll",
            ["group", "topic", "partition"])


class BadEvent(Exception):
    """An event that can never be handled (missing id, malformed field): dead-lettered."""


class StorageUnavailable(Exception):
    """Storage still failing after the handler's bounded retries: the consumer must not commit
    past this event, and tries it again later."""


@dataclass(frozen=True)
class EventMeta:
    event_id: str
    fallback_time: datetime  # when the event has no create_time: the Kafka record's time


# A handler returns its outcome's name (a metrics label): "sent", "duplicate", "applied", ...
Handler = Callable[[Message, EventMeta], Awaitable[str]]


@dataclass(frozen=True)
class Route:
    message_type: type[Message]
    handler: Handler


@dataclass(frozen=True)
class _Progress:
    partition: TopicPartition
    commit_offset: int | None  # next offset to read, after the records done in this batch
    rewind_offset: int | None  # where to read again (not done: storage down, deadline, stop)
    storage_down: bool


class _FinishBatchBeforeRevoke(ConsumerRebalanceListener):  # type: ignore[misc]  # untyped base
    """Holds this member's part of a rebalance until the batch in hand is done and committed."""

    def __init__(self, group_id: str, idle: asyncio.Event, bound_s: float) -> None:
        self._group_id = group_id
        self._idle = idle
        self._bound_s = bound_s
        self.revocations = 0  # how many rebalances began; a batch fetched across one is not worked on

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.revocations += 1
        if not revoked or self._idle.is_set():
            return
        log.info("rebalance: finishing the batch in hand first", extra=fields(group=self._group_id))
        try:
            await asyncio.wait_for(self._idle.wait(), self._bound_s)
        except TimeoutError:
            log.warning("rebalance: the batch in hand did not finish in time", extra=fields(
                group=self._group_id, bound_s=self._bound_s))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        pass


def member_name(settings: Settings, group_id: str) -> str | None:
    """A service process's static member name in a group, stable across its restarts and unique
    among live processes (the host, and which process of its service on that host it is); None
    (a dynamic member) unless the launcher vouches for the index (BANK_CONSUMER_STATIC_MEMBER)."""
    if not settings.consumer_static_member:
        return None
    return f"{group_id}-{socket.gethostname()}-{settings.process_index}"


class EventConsumer:
    """Started as a worker of the service: start() returns at once, the loop runs as a task.
    static_member: the group.instance.id to join with (member_name() for a service's process);
    None joins as a dynamic member, which leaves the group when it stops."""

    def __init__(self, settings: Settings, *, group_id: str, topics: Sequence[str],
                 routes: Mapping[str, Route], event_worst_case_s: float, ordered: bool = True,
                 batch_max_records: int = BATCH_MAX_RECORDS, static_member: str | None = None) -> None:
        # A record started just before the deadline may still take the handlers' worst case; the
        # poll after it must come before Kafka gives up on this member.
        if BATCH_DEADLINE_S + event_worst_case_s >= POLL_INTERVAL_MS_MAX / 1000:
            raise ValueError(f"{group_id}: handlers' worst case {event_worst_case_s}s exceeds the poll interval")
        if not 1 <= batch_max_records <= BATCH_MAX_RECORDS_LIMIT:
            raise ValueError(f"batch_max_records {batch_max_records} is out of range")
        self._settings = settings
        self._ordered = ordered
        self._batch_max_records = batch_max_records
        self._group_id = group_id
        self._static_member = static_member
        self._topics = list(topics)
        self._routes = dict(routes)
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._dead_letters: AIOKafkaProducer | None = None
        self._lag_partitions: set[TopicPartition] = set()  # the partitions LAG has a series for
        self._idle = asyncio.Event()  # no batch in hand (see _FinishBatchBeforeRevoke)
        self._idle.set()
        # A batch started just before a rebalance runs to its deadline, then gets its commit.
        self._rebalance_wait_s = BATCH_DEADLINE_S + event_worst_case_s + REQUEST_TIMEOUT_MS / 1000

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{self._group_id}-consumer")

    async def stop(self) -> None:
        """Finish the record in hand (bounded by STOP_GRACE_S), commit, leave the group."""
        self._stopping.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), STOP_GRACE_S)
        except TimeoutError:
            log.warning("consumer did not stop in time; cancelling", extra=fields(grace_s=STOP_GRACE_S))
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake up at once on stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _run(self) -> None:
        # Runs until stop(): a supervisor, so it never gives up; each restart waits longer, up to
        # PAUSES.max_s, and a clean run resets the count.
        failures = 0
        while not self._stopping.is_set():
            try:
                await self._consume()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker down, or a bug: loud in the log, then again, bounded
                failures += 1
                pause_s = PAUSES.delay_s(failures)
                log.error("consumer interrupted; restarting", exc_info=exc, extra=fields(retry_in_s=round(pause_s, 3)))
                await self._pause(pause_s)
            else:
                failures = 0
        log.info("consumer stopped", extra=fields(group=self._group_id))

    async def _consume(self) -> None:
        await ensure_topics(self._settings)  # the same topics, settings and code as the outbox relay
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._settings.kafka_bootstrap,
            group_id=self._group_id,
            group_instance_id=self._static_member,
            client_id=f"{self._group_id}-{os.getpid()}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",  # never act on an aborted transaction's records
            max_poll_records=self._batch_max_records,
            max_poll_interval_ms=POLL_INTERVAL_MS_MAX,
            rebalance_timeout_ms=REBALANCE_TIMEOUT_MS,
            session_timeout_ms=SESSION_TIMEOUT_MS,
            heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS,
            request_timeout_ms=REQUEST_TIMEOUT_MS,
        )
        rebalances = _FinishBatchBeforeRevoke(self._group_id, self._idle, self._rebalance_wait_s)
        consumer.subscribe(self._topics, listener=rebalances)
        producer = AIOKafkaProducer(bootstrap_servers=self._settings.kafka_bootstrap, acks="all",
                                    enable_idempotence=True, request_timeout_ms=int(DLQ_SEND_TIMEOUT_S * 1000))
        await producer.start()
        try:
            await consumer.start()
        except BaseException:
            await producer.stop()
            raise
        self._dead_letters = producer
        log.info("consumer started", extra=fields(topics=self._topics, group=self._group_id))
        storage_failures = 0
        try:
            while not self._stopping.is_set():  # until stop(), or an error for _run to restart from
                revocations = rebalances.revocations
                batch = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=self._batch_max_records)
                if batch and rebalances.revocations != revocations:
                    self._rewind(consumer, batch)  # may be another member's now: read again by the owner
                    continue
                self._idle.clear()
                try:
                    storage_down = bool(batch) and await self._process(consumer, batch)
                finally:
                    self._idle.set()
                await self._measure_lag(consumer)
                if storage_down:
                    storage_failures += 1
                    pause_s = PAUSES.delay_s(storage_failures)
                    log.warning("storage unavailable; pausing before reading again",
                                extra=fields(pause_s=round(pause_s, 3)))
                    await self._pause(pause_s)
                elif batch:
                    storage_failures = 0
        finally:
            self._dead_letters = None
            try:
                # A dynamic member leaves the group: its partitions move on at once. A static one
                # is given up after the session timeout, unless it comes back first.
                await consumer.stop()
            finally:
                await producer.stop()

    @staticmethod
    def _rewind(consumer: AIOKafkaConsumer, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        for partition, records in batch.items():
            with contextlib.suppress(IllegalStateError):  # no longer ours
                consumer.seek(partition, records[0].offset)

    async def _measure_lag(self, consumer: AIOKafkaConsumer) -> None:
        """LAG for every partition this process owns, from what the last fetch responses said
        (no request to the broker); a partition that moved to another member loses its series,
        so a group's lag is the sum over its members without double counting."""
        assigned = set(consumer.assignment())
        for gone in self._lag_partitions - assigned:
            with contextlib.suppress(KeyError):
                LAG.remove(self._group_id, gone.topic, str(gone.partition))
        self._lag_partitions &= assigned
        for partition in assigned:
            end = consumer.last_stable_offset(partition)
            if end is None or end < 0:
                end = consumer.highwater(partition)
            # No fetch answered for it yet: nothing known. Once one has, the partition has a valid
            # position, so position() returns at once instead of waiting for one.
            if end is None:
                continue
            try:
                position = await consumer.position(partition)
            except IllegalStateError:  # revoked meanwhile
                continue
            LAG.labels(self._group_id, partition.topic, str(partition.partition)).set(max(0, end - position))
            self._lag_partitions.add(partition)

    async def _process(self, consumer: AIOKafkaConsumer,
                       batch: dict[TopicPartition, list[ConsumerRecord]]) -> bool:
        """Work through a batch; commit what is done, rewind what is not. True if storage was down."""
        deadline = asyncio.get_running_loop().time() + BATCH_DEADLINE_S
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self._drain(tp, records, deadline)) for tp, records in batch.items()]
        progress = [task.result() for task in tasks]
        offsets = {p.partition: p.commit_offset for p in progress if p.commit_offset is not None}
        if offsets:
            try:
                await consumer.commit(offsets)
            except (CommitFailedError, IllegalStateError) as exc:
                # The group rebalanced meanwhile: the new owner reads these again and drops duplicates.
                log.warning("offset commit refused; records will be redelivered", extra=fields(error=str(exc)))
        for p in progress:
            if p.rewind_offset is not None:
                with contextlib.suppress(IllegalStateError):  # no longer ours after a rebalance
                    consumer.seek(p.partition, p.rewind_offset)
        return any(p.storage_down for p in progress)

    async def _drain(self, partition: TopicPartition, records: Sequence[ConsumerRecord], deadline: float) -> _Progress:
        if not self._ordered:
            return await self._drain_together(partition, records)
        loop = asyncio.get_running_loop()
        commit_offset: int | None = None
        for record in records:
            if self._stopping.is_set() or loop.time() > deadline:
                return _Progress(partition, commit_offset, record.offset, storage_down=False)
            try:
                await self._handle(record)
            except StorageUnavailable as exc:
                log.warning("storage unavailable; event will be read again",
                            extra=fields(topic=partition.topic, partition=partition.partition, offset=record.offset,
                                         error=str(exc)))
                return _Progress(partition, commit_offset, record.offset, storage_down=True)
            commit_offset = record.offset + 1
        return _Progress(partition, commit_offset, None, storage_down=False)

    async def _drain_together(self, partition: TopicPartition, records: Sequence[ConsumerRecord]) -> _Progress:
        """All records at once; done up to the first one that is not (the ones after it that
        did finish are done again on redelivery, which order-free handlers allow). Copies of one
        record in the batch (the relay published it again) are worked on once: handled side by
        side, both copies would pass a handler's duplicate check before either had finished."""
        if self._stopping.is_set():
            return _Progress(partition, None, records[0].offset, storage_down=False)
        first_copy: dict[tuple[bytes | None, bytes | None], int] = {}
        originals = [first_copy.setdefault((r.key, r.value), i) for i, r in enumerate(records)]
        unique = [records[i] for i in sorted(set(originals))]
        handled = dict(zip((r.offset for r in unique),
                           await asyncio.gather(*(self._handle(r) for r in unique), return_exceptions=True),
                           strict=True))
        for record, original in zip(records, originals, strict=True):
            if records[original] is not record:
                log.info("a copy of an event in the same batch; worked on once", extra=fields(
                    topic=partition.topic, partition=partition.partition, offset=record.offset,
                    copy_of=records[original].offset, group=self._group_id))
        results = [handled[records[original].offset] for original in originals]
        commit_offset: int | None = None
        for record, result in zip(records, results, strict=True):
            if isinstance(result, StorageUnavailable):
                log.warning("storage unavailable; event will be read again",
                            extra=fields(topic=partition.topic, partition=partition.partition, offset=record.offset,
                                         error=str(result)))
                return _Progress(partition, commit_offset, record.offset, storage_down=True)
            if isinstance(result, BaseException):
                raise result  # the broker refused a dead letter, or a bug: the consumer restarts
            commit_offset = record.offset + 1
        return _Progress(partition, commit_offset, None, storage_down=False)

    async def _handle(self, record: ConsumerRecord) -> None:
        headers = decode_headers(record.headers)
        event_type = headers.get("event_type", "")
        token = request_id_var.set(headers.get("request_id", "")[:128])
        started = time.perf_counter()
        where = {"topic": record.topic, "partition": record.partition, "offset": record.offset,
                 "event_type": event_type, "group": self._group_id}
        try:
            with tracing.consuming(headers, topic=record.topic, partition=record.partition, offset=record.offset,
                                   group=self._group_id, event_type=event_type):
                route = self._routes.get(event_type)
                if route is None:
                    log.debug("event type not handled here; skipped", extra=fields(**where))
                    EVENTS.labels(self._group_id, event_type[:100] or "none", "ignored").inc()
                    return
                try:
                    message = route.message_type.FromString(record.value or b"")
                except DecodeError:
                    await self._dead_letter(record, f"value is not a valid {event_type}", where)
                    return
                event_id = str(getattr(message, "event_id", "")) or headers.get("event_id", "")
                if headers.get("event_id") and headers["event_id"] != event_id:
                    log.warning("event_id header differs from the event's; using the event's", extra=fields(**where))
                if not event_id:
                    await self._dead_letter(record, "event has no event_id", where)
                    return
                meta = EventMeta(event_id, datetime.fromtimestamp(record.timestamp / 1000, UTC))
                try:
                    # An unclassified error (a bug or an odd dependency error) is tried again, a
                    # few times; storage down and a bad event are decided at once.
                    outcome = await retry(lambda: route.handler(message, meta), what="event handler",
                                          transient=(Exception,), permanent=(StorageUnavailable, BadEvent),
                                          backoff=HANDLER_BACKOFF)
                except StorageUnavailable:
                    raise
                except BadEvent as exc:
                    await self._dead_letter(record, f"bad event: {exc}", where)
                    return
                except Exception as exc:
                    log.error("handler keeps failing", exc_info=exc, extra=fields(**where, event_id=event_id))
                    await self._dead_letter(record, f"{type(exc).__name__}: {exc}", where)
                    return
                EVENTS.labels(self._group_id, event_type, str(outcome)).inc()
                created = getattr(message, "create_time", None)
                if created is not None and message.HasField("create_time"):
                    EVENT_AGE.labels(self._group_id, event_type).observe(time.time() - created.ToNanoseconds() / 1e9)
                # One line per event, as the RPC interceptor writes one per RPC: what following
                # one request across processes by its request_id needs (docs/decisions/0009).
                log.info("event handled", extra=fields(**where, event_id=event_id, outcome=str(outcome),
                                                       duration_ms=round((time.perf_counter() - started) * 1000, 2)))
        finally:
            request_id_var.reset(token)

    async def _dead_letter(self, record: ConsumerRecord, error: str, where: dict[str, object]) -> None:
        """Park the record on "<topic>.dlq" with the error; raises (nothing committed) if the
        broker does not take it, so a poisoned record is never dropped silently."""
        producer = self._dead_letters
        assert producer is not None, "dead-lettering outside of a running consumer"
        log.error("event cannot be handled; sent to the dead-letter topic", extra=fields(**where, error=error))
        headers = [(key, value) for key, value in (record.headers or ()) if not key.startswith("dlq_")]
        headers += [
            (DLQ_HEADER_ERROR, error[:DLQ_ERROR_MAX_CHARS].encode()),
            (DLQ_HEADER_GROUP, self._group_id.encode()),
            (DLQ_HEADER_SOURCE, f"{record.topic}/{record.partition}/{record.offset}".encode()),
            (DLQ_HEADER_TIME, datetime.now(UTC).isoformat().encode()),
        ]
        sent = await producer.send(dlq_topic(record.topic), record.value, key=record.key, headers=headers)
        await asyncio.wait_for(sent, DLQ_SEND_TIMEOUT_S)
        EVENTS.labels(self._group_id, str(where.get("event_type") or "none")[:100], "dead_lettered").inc()

"""The Kafka consumer of svc_notify: customer events in, service use cases out.

- Group "svc_notify", offsets committed by hand and only for records whose work is done, so a
  crash or a rebalance redelivers, never skips (duplicates are the service's to drop).
- Each poll takes a bounded batch; each partition of it is worked through in order (one
  customer's events stay in order), partitions side by side.
- An event that can never be handled (unknown type, bad bytes, bad field) is logged and
  committed; issue 5 sends those to a dead-letter topic. When storage is down after the
  service's bounded retries, nothing past that event is committed: its partition is rewound
  to it and the consumer pauses with a bounded, growing backoff before polling again.
- A batch has a deadline so the consumer polls often enough to stay in the group, whatever
  the dependencies do (see the assertion on the constants below).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError
from bank.events.v1 import events_pb2
from google.protobuf.message import DecodeError, Message
from prometheus_client import Counter

from common.config import Settings
from common.events import CUSTOMER_TOPIC
from common.logging import fields, request_id_var
from common.outbox import decode_headers, ensure_topics
from svc_notify import service
from svc_notify.mailer import Mailer
from svc_notify.store import Store

log = logging.getLogger("consumer")

GROUP_ID = "svc_notify"
BATCH_MAX_RECORDS = 50
POLL_TIMEOUT_MS = 1000
BATCH_DEADLINE_S = 30.0  # no new record of a batch is started after this; the rest is fetched again
MAX_POLL_INTERVAL_MS = 600_000
# How long a rebalance waits for a live member to rejoin (a dead one drops out after the session
# timeout): a member rejoins at its next poll, so the same bound as the poll interval.
REBALANCE_TIMEOUT_MS = MAX_POLL_INTERVAL_MS
SESSION_TIMEOUT_MS = 10_000
HEARTBEAT_INTERVAL_MS = 3_000
REQUEST_TIMEOUT_MS = 30_000
STOP_GRACE_S = 8.0  # the record in hand gets this long to finish on shutdown
PAUSE_INITIAL_S = 0.5
PAUSE_MAX_S = 30.0

# A record started just before the deadline may still take the service's worst case; the poll
# after it must come before Kafka gives up on this member.
assert BATCH_DEADLINE_S + service.EVENT_WORST_CASE_S < MAX_POLL_INTERVAL_MS / 1000, "poll interval too short"

Handler = Callable[[Message, service.EventMeta], Awaitable[service.Outcome]]

EVENTS = Counter("notify_events_total", "Customer events consumed, by type and outcome", ["event_type", "outcome"])


@dataclass(frozen=True)
class _Progress:
    partition: TopicPartition
    commit_offset: int | None  # next offset to read, after the records done in this batch
    rewind_offset: int | None  # where to read again (not done: storage down, deadline, stop)
    storage_down: bool


class EventConsumer:
    """Started as a worker of the service: start() returns at once, the loop runs as a task."""

    def __init__(self, settings: Settings, store: Store, sender: Mailer) -> None:
        self._settings = settings
        self._store = store
        self._sender = sender
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        registered = events_pb2.CustomerRegistered
        verified = events_pb2.EmailVerified
        self._handlers: dict[str, tuple[type[Message], Handler]] = {
            registered.DESCRIPTOR.full_name: (registered, self._customer_registered),
            verified.DESCRIPTOR.full_name: (verified, self._email_verified),
        }

    async def _customer_registered(self, message: Message, meta: service.EventMeta) -> service.Outcome:
        assert isinstance(message, events_pb2.CustomerRegistered)
        return await service.customer_registered(self._store, self._sender, message, meta)

    async def _email_verified(self, message: Message, meta: service.EventMeta) -> service.Outcome:
        assert isinstance(message, events_pb2.EmailVerified)
        return await service.email_verified(self._store, message, meta)

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="svc_notify-consumer")

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
        pause_s = PAUSE_INITIAL_S
        while not self._stopping.is_set():
            try:
                await self._consume()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker down, or a bug: loud in the log, then again, bounded
                log.error("consumer interrupted; restarting", exc_info=exc, extra=fields(retry_in_s=pause_s))
                await self._pause(pause_s)
                pause_s = min(PAUSE_MAX_S, pause_s * 2)
            else:
                pause_s = PAUSE_INITIAL_S
        log.info("consumer stopped")

    async def _consume(self) -> None:
        await ensure_topics(self._settings)  # the same topics, settings and code as the outbox relay
        consumer = AIOKafkaConsumer(
            CUSTOMER_TOPIC,
            bootstrap_servers=self._settings.kafka_bootstrap,
            group_id=GROUP_ID,
            client_id=f"svc_notify-{os.getpid()}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",  # never act on an aborted transaction's records
            max_poll_records=BATCH_MAX_RECORDS,
            max_poll_interval_ms=MAX_POLL_INTERVAL_MS,
            rebalance_timeout_ms=REBALANCE_TIMEOUT_MS,
            session_timeout_ms=SESSION_TIMEOUT_MS,
            heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS,
            request_timeout_ms=REQUEST_TIMEOUT_MS,
        )
        await consumer.start()
        log.info("consumer started", extra=fields(topic=CUSTOMER_TOPIC, group=GROUP_ID))
        pause_s = PAUSE_INITIAL_S
        try:
            while not self._stopping.is_set():
                batch = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=BATCH_MAX_RECORDS)
                if not batch:
                    continue
                if await self._process(consumer, batch):
                    log.warning("storage unavailable; pausing before reading again", extra=fields(pause_s=pause_s))
                    await self._pause(pause_s)
                    pause_s = min(PAUSE_MAX_S, pause_s * 2)
                else:
                    pause_s = PAUSE_INITIAL_S
        finally:
            await consumer.stop()  # leaves the group: its partitions move on at once

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
        loop = asyncio.get_running_loop()
        commit_offset: int | None = None
        for record in records:
            if self._stopping.is_set() or loop.time() > deadline:
                return _Progress(partition, commit_offset, record.offset, storage_down=False)
            try:
                await self._handle(record)
            except service.StorageUnavailable as exc:
                log.warning("storage unavailable; event will be read again",
                            extra=fields(partition=partition.partition, offset=record.offset, error=str(exc)))
                return _Progress(partition, commit_offset, record.offset, storage_down=True)
            commit_offset = record.offset + 1
        return _Progress(partition, commit_offset, None, storage_down=False)

    async def _handle(self, record: ConsumerRecord) -> None:
        headers = decode_headers(record.headers)
        event_type = headers.get("event_type", "")
        token = request_id_var.set(headers.get("request_id", "")[:128])
        where = {"partition": record.partition, "offset": record.offset, "event_type": event_type}
        try:
            entry = self._handlers.get(event_type)
            if entry is None:
                log.info("event type not handled here; skipped", extra=fields(**where))
                EVENTS.labels(event_type[:100] or "none", "ignored").inc()
                return
            message_type, handler = entry
            try:
                message = message_type.FromString(record.value or b"")
            except DecodeError:
                log.error("event value is not a valid %s; skipped", event_type, extra=fields(**where))
                EVENTS.labels(event_type, "malformed").inc()
                return
            event_id = str(getattr(message, "event_id", "")) or headers.get("event_id", "")
            if headers.get("event_id") and headers["event_id"] != event_id:
                log.warning("event_id header differs from the event's; using the event's", extra=fields(**where))
            if not event_id:
                log.error("event has no event_id; skipped", extra=fields(**where))
                EVENTS.labels(event_type, "malformed").inc()
                return
            record_time = datetime.fromtimestamp(record.timestamp / 1000, UTC)
            try:
                outcome = await handler(message, service.EventMeta(event_id, record_time))
            except service.BadEvent as exc:
                log.error("event cannot be handled; skipped", extra=fields(**where, event_id=event_id, error=str(exc)))
                EVENTS.labels(event_type, "malformed").inc()
                return
            EVENTS.labels(event_type, outcome.value).inc()
            log.debug("event handled", extra=fields(**where, event_id=event_id, outcome=outcome.value))
        finally:
            request_id_var.reset(token)

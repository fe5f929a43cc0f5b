"""Inspect and replay dead-lettered events (see common/consumer.py).

    python -m common.dlq list   [--topic bank.transfer.v1.dlq] [--limit 100]
    python -m common.dlq replay [--topic bank.transfer.v1.dlq] [--limit 1000]

`list` prints each parked record as one JSON line (offset, key, the error, the group that
gave up on it, where it came from, its headers), oldest first, without changing anything.
`replay` publishes parked records back to their source topic, with their original headers, and
remembers how far it got (consumer group "dlq-replay"), so a record is replayed once; the copies
of one event that several groups parked go back as one. Every
consumer group of the source topic sees it again and drops what it already did by event_id;
one that still cannot handle it parks it again. Both stop at the end offsets seen at start and
after --limit records: bounded, never waiting for new ones."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
from collections.abc import Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from common import config
from common.consumer import DLQ_HEADER_ERROR, DLQ_HEADER_GROUP, DLQ_HEADER_SOURCE, DLQ_HEADER_TIME
from common.events import DLQ_SUFFIX, TOPICS, TRANSFER_TOPIC, dlq_topic
from common.outbox import decode_headers, ensure_topics

REPLAY_GROUP_ID = "dlq-replay"
LIMIT_MAX = 100_000
FETCH_TIMEOUT_MS = 2_000
IDLE_POLLS_MAX = 3  # polls in a row that bring nothing before giving up on reaching the end offsets
SEND_TIMEOUT_S = 30.0


def describe(record: ConsumerRecord) -> dict[str, Any]:
    headers = decode_headers(record.headers)
    return {
        "offset": record.offset,
        "key": (record.key or b"").decode("utf-8", "replace"),
        "event_type": headers.get("event_type", ""),
        "event_id": headers.get("event_id", ""),
        "error": headers.get(DLQ_HEADER_ERROR, ""),
        "group": headers.get(DLQ_HEADER_GROUP, ""),
        "source": headers.get(DLQ_HEADER_SOURCE, ""),
        "dead_letter_time": headers.get(DLQ_HEADER_TIME, ""),
        "value_base64": base64.b64encode(record.value or b"").decode(),
    }


def source_topic(record: ConsumerRecord) -> str:
    source = decode_headers(record.headers).get(DLQ_HEADER_SOURCE, "")
    topic = source.rsplit("/", 2)[0] if source.count("/") >= 2 else record.topic.removesuffix(DLQ_SUFFIX)
    if not topic or topic.endswith(DLQ_SUFFIX):
        raise ValueError(f"record {record.offset} has no usable source topic ({source!r})")
    return topic


def _partitions(topic: str) -> list[TopicPartition]:
    """The dead-letter topic's partitions, as common.events creates them."""
    if topic not in TOPICS:
        raise ValueError(f"{topic} is not one of the dead-letter topics: {', '.join(t for t in TOPICS if t.endswith(DLQ_SUFFIX))}")
    return [TopicPartition(topic, p) for p in range(TOPICS[topic])]


async def _read(consumer: AIOKafkaConsumer, topic: str, limit: int) -> list[ConsumerRecord]:
    """Records of topic from the consumer's position up to the end offsets seen now, at most limit."""
    partitions = _partitions(topic)
    end = await consumer.end_offsets(partitions)
    records: list[ConsumerRecord] = []
    idle = 0
    while len(records) < limit and idle < IDLE_POLLS_MAX:
        positions = [await consumer.position(tp) for tp in partitions]
        if all(position >= end[tp] for position, tp in zip(positions, partitions, strict=True)):
            break
        batch = await consumer.getmany(timeout_ms=FETCH_TIMEOUT_MS, max_records=min(500, limit - len(records)))
        idle = 0 if batch else idle + 1
        for tp_records in batch.values():
            records += [r for r in tp_records if r.offset < end[TopicPartition(r.topic, r.partition)]]
    return records[:limit]


async def end_offsets(settings: config.Settings, topic: str) -> dict[int, int]:
    """Where each partition of the dead-letter topic ends now: list_records(after=…) reads what comes later."""
    await ensure_topics(settings)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, isolation_level="read_committed",
                                request_timeout_ms=30_000)
    await consumer.start()
    try:
        end = await consumer.end_offsets(_partitions(topic))
        return {tp.partition: offset for tp, offset in end.items()}
    finally:
        await consumer.stop()


async def list_records(settings: config.Settings, topic: str, limit: int,
                       after: Mapping[int, int] | None = None) -> list[dict[str, Any]]:
    """Parked records, oldest first: from the beginning, or from the offsets `after` (by partition)."""
    await ensure_topics(settings)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                                isolation_level="read_committed", request_timeout_ms=30_000)
    await consumer.start()
    try:
        partitions = _partitions(topic)
        consumer.assign(partitions)
        if after is None:
            await consumer.seek_to_beginning(*partitions)
        else:
            for tp in partitions:
                consumer.seek(tp, after.get(tp.partition, 0))
        return [describe(r) for r in await _read(consumer, topic, limit)]
    finally:
        await consumer.stop()


async def replay(settings: config.Settings, topic: str, limit: int) -> list[dict[str, Any]]:
    """Publish up to limit not-yet-replayed records back to their sources; returns what it replayed."""
    await ensure_topics(settings)
    # Assigned, not subscribed: no group membership to wait for, but offsets still committed
    # under REPLAY_GROUP_ID, so each run starts after the last record replayed.
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=REPLAY_GROUP_ID,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                isolation_level="read_committed", request_timeout_ms=30_000)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True,
                                request_timeout_ms=int(SEND_TIMEOUT_S * 1000))
    await producer.start()
    await consumer.start()
    try:
        partitions = _partitions(topic)
        consumer.assign(partitions)
        records = await _read(consumer, topic, limit)
        replayed = []
        # Each consumer group that gave up on an event parked its own copy, but one copy back on
        # the source topic reaches every group. Publishing every copy would hand each group the
        # event once per copy, and each still-failing group would park it that many times again:
        # the parked copies would double with every replay.
        published: set[tuple[str, str]] = set()
        for record in records:
            source = source_topic(record)
            event_id = decode_headers(record.headers).get("event_id", "")
            if not event_id or (source, event_id) not in published:
                headers = [(k, v) for k, v in (record.headers or ()) if not k.startswith("dlq_")]
                sent = await producer.send(source, record.value, key=record.key, headers=headers)
                await asyncio.wait_for(sent, SEND_TIMEOUT_S)
                published.add((source, event_id))
                replayed.append(describe(record))
            # One at a time: an interrupted replay starts again after the last record it handled.
            await consumer.commit({TopicPartition(record.topic, record.partition): record.offset + 1})
        return replayed
    finally:
        await consumer.stop()
        await producer.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.dlq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["list", "replay"])
    parser.add_argument("--topic", default=dlq_topic(TRANSFER_TOPIC), help="a dead-letter topic (<topic>.dlq)")
    parser.add_argument("--limit", type=int, default=None, help="most records to list (100) or replay (1000)")
    args = parser.parse_args(argv)
    if not args.topic.endswith(DLQ_SUFFIX):
        parser.error(f"--topic must be a dead-letter topic ending in {DLQ_SUFFIX}")
    limit = args.limit if args.limit is not None else (100 if args.command == "list" else 1000)
    if not 1 <= limit <= LIMIT_MAX:
        parser.error(f"--limit must be between 1 and {LIMIT_MAX}")
    settings = config.load()
    if args.command == "list":
        rows = asyncio.run(list_records(settings, args.topic, limit))
    else:
        rows = asyncio.run(replay(settings, args.topic, limit))
    for row in rows:
        print(json.dumps(row, separators=(",", ":")))
    print(f"{args.command}: {len(rows)} record(s) of {args.topic}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

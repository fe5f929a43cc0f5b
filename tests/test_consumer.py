"""common/consumer.py against the real Kafka: what the framework promises beyond one consumer."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections import Counter
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient
from bank.events.v1 import events_pb2
from google.protobuf.message import Message

from common import config
from common.config import Settings
from common.consumer import EventConsumer, EventMeta, Route
from common.events import TOPICS
from devstack.components import TEMPLATES, render
from devstack.stack import Stack
from tests.events_support import publish, scratch_topic

RECORDS_PER_PARTITION = 3
HANDLING_S = 2.0  # per record: a batch of one partition takes 6 s, long enough to be mid-batch


async def test_a_member_joining_mid_batch_never_works_the_same_records_twice(stack: Stack, settings: Settings) -> None:
    """A second live member joins the group while the first is in the middle of a batch. The
    first finishes and commits that batch before it gives up a partition, so the second starts
    after it: every event is handled exactly once (before, both worked the same records, which
    in svc_notify means a second email)."""
    group = f"test-rebalance-{uuid.uuid4().hex[:8]}"
    async with scratch_topic(settings, "test.rebalance", partitions=2) as topic:
        for partition in (0, 1):
            await publish(settings, topic, *(events_pb2.MoneyMoved(event_id=f"p{partition}-{n}", transfer_id=f"t-{n}")
                                             for n in range(RECORDS_PER_PARTITION)), partition=partition)

        handled: list[tuple[str, str]] = []  # (member, event_id), in the order handlers started

        def member(name: str) -> EventConsumer:
            async def slow(message: Message, meta: EventMeta) -> str:
                handled.append((name, meta.event_id))
                await asyncio.sleep(HANDLING_S)
                return "applied"

            routes = {events_pb2.MoneyMoved.DESCRIPTOR.full_name: Route(events_pb2.MoneyMoved, slow)}
            return EventConsumer(settings, group_id=group, topics=[topic], routes=routes, event_worst_case_s=5.0)

        first, second = member("first"), member("second")
        await first.start()
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while not handled:  # the first member is in the middle of its batch
                assert loop.time() < deadline, "the first member never started"
                await asyncio.sleep(0.05)
            await second.start()
            try:
                while len({event_id for _, event_id in handled}) < 2 * RECORDS_PER_PARTITION:
                    assert loop.time() < deadline + 30, handled
                    await asyncio.sleep(0.1)
                # Long enough for a second member working the same records to have started them.
                await asyncio.sleep(2 * HANDLING_S)
            finally:
                await second.stop()
        finally:
            await first.stop()
        counts = Counter(event_id for _, event_id in handled)
        assert set(counts.values()) == {1}, handled


async def test_copies_of_one_event_in_a_batch_are_worked_on_once(stack: Stack, settings: Settings) -> None:
    """The relay may publish an event again (a send timeout, a crash before marking it sent); two
    copies arriving in one batch of an order-free consumer were handled side by side, so both
    passed the handler's duplicate check (svc_notify sent the email twice). Now once, and the
    offsets of both are committed."""
    group = f"test-copies-{uuid.uuid4().hex[:8]}"
    async with scratch_topic(settings, "test.copies") as topic:
        event = events_pb2.MoneyMoved(event_id="copy-1", transfer_id="t-1")
        other = events_pb2.MoneyMoved(event_id="copy-2", transfer_id="t-2")
        await publish(settings, topic, event, event, other, event, key=b"t")
        calls: list[str] = []

        async def slow(message: Message, meta: EventMeta) -> str:
            calls.append(meta.event_id)
            await asyncio.sleep(0.5)  # both copies would be in their handlers at once
            return "applied"

        routes = {events_pb2.MoneyMoved.DESCRIPTOR.full_name: Route(events_pb2.MoneyMoved, slow)}
        consumer = EventConsumer(settings, group_id=group, topics=[topic], routes=routes, event_worst_case_s=5.0,
                                 ordered=False)
        await consumer.start()
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=10_000)
        await admin.start()
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            committed = -1
            while committed < 4:
                assert loop.time() < deadline, (calls, committed)
                await asyncio.sleep(0.2)
                offsets = await admin.list_consumer_group_offsets(group)
                committed = max((o.offset for o in offsets.values()), default=-1)
        finally:
            await admin.close()
            await consumer.stop()
        assert sorted(calls) == ["copy-1", "copy-2"], calls


async def test_the_bank_topics_have_the_configured_replication_factor(stack: Stack, settings: Settings) -> None:
    """BANK_KAFKA_REPLICATION_FACTOR (1 on the local stack's one broker) is what the topics were
    created with, and what the local broker gives a topic created without one."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        described = await admin.describe_topics(list(TOPICS))
    finally:
        await admin.close()
    assert {topic["topic"]: {len(p["replicas"]) for p in topic["partitions"]} for topic in described} \
        == {topic: {settings.kafka_replication_factor} for topic in TOPICS}


def test_the_local_broker_config_takes_the_replication_factor_setting(tmp_path: Path) -> None:
    settings = dataclasses.replace(config.load({}), kafka_replication_factor=3)
    props = render(TEMPLATES / "kafka-server.properties", tmp_path / "kafka.properties", host="127.0.0.1",
                   port=9092, controller_port=9093, data_dir=tmp_path, replication_factor=settings.kafka_replication_factor)
    assert "default.replication.factor=3" in props.read_text().splitlines()
    assert config.load({"BANK_KAFKA_REPLICATION_FACTOR": "3"}).kafka_replication_factor == 3
    assert config.load({}).kafka_replication_factor == 1

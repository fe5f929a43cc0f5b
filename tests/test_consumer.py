"""common/consumer.py against the real Kafka: what the framework promises beyond one consumer."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from bank.events.v1 import events_pb2
from google.protobuf.message import Message

from common import config, consumer
from common.config import Settings
from common.consumer import EventConsumer, EventMeta, Route
from common.events import TOPICS
from devstack.components import TEMPLATES, render
from devstack.stack import Stack
from tests.events_support import publish, scratch_topic

REPO_ROOT = Path(__file__).resolve().parents[1]
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


# A member process of its own, to be killed: prints each event it handled, then commits it.
MEMBER_PROCESS = """
import asyncio, sys
from bank.events.v1 import events_pb2
from common import config, consumer
consumer.SESSION_TIMEOUT_MS = int(sys.argv[4])

async def main():
    async def handle(message, meta):
        print("handled", meta.event_id, flush=True)
        return "applied"
    routes = {events_pb2.MoneyMoved.DESCRIPTOR.full_name: consumer.Route(events_pb2.MoneyMoved, handle)}
    member = consumer.EventConsumer(config.load(), group_id=sys.argv[1], topics=[sys.argv[2]], routes=routes,
                                    event_worst_case_s=1.0, static_member=sys.argv[3])
    await member.start()
    await asyncio.sleep(600)

asyncio.run(main())
"""
DEAD_MEMBER_SESSION_S = 60  # how long the broker keeps a silent dynamic member in the group


async def test_a_restarted_process_takes_its_own_place_at_once(stack: Stack, settings: Settings,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A consumer process is killed (SIGKILL: no goodbye to the broker) and started again. As a
    static member under the same name it gets its partition back at once and goes on from the
    committed offset. A dynamic member would first wait for the dead one to be given up (the
    session timeout; up to the whole rebalance timeout when the broker restarted meanwhile)."""
    group = f"test-static-{uuid.uuid4().hex[:8]}"
    name = f"{group}-host-0"
    async with scratch_topic(settings, "test.static") as topic:
        await publish(settings, topic, events_pb2.MoneyMoved(event_id="before", transfer_id="t-1"))
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", MEMBER_PROCESS, group, topic, name, str(DEAD_MEMBER_SESSION_S * 1000),
            cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE)
        try:
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), 60)
            assert line.split() == [b"handled", b"before"], line
            admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=10_000)
            await admin.start()
            try:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 30
                while not any(o.offset == 1 for o in (await admin.list_consumer_group_offsets(group)).values()):
                    assert loop.time() < deadline, "the first member never committed"
                    await asyncio.sleep(0.1)
            finally:
                await admin.close()
        finally:
            process.kill()  # SIGKILL
            await asyncio.wait_for(process.wait(), 30)

        handled: list[str] = []

        async def handle(message: Message, meta: EventMeta) -> str:
            handled.append(meta.event_id)
            return "applied"

        routes = {events_pb2.MoneyMoved.DESCRIPTOR.full_name: Route(events_pb2.MoneyMoved, handle)}
        monkeypatch.setattr(consumer, "SESSION_TIMEOUT_MS", DEAD_MEMBER_SESSION_S * 1000)
        restarted = EventConsumer(settings, group_id=group, topics=[topic], routes=routes, event_worst_case_s=1.0,
                                  static_member=name)
        await publish(settings, topic, events_pb2.MoneyMoved(event_id="after", transfer_id="t-2"))
        await restarted.start()
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + DEAD_MEMBER_SESSION_S / 2  # well before the dead member could be given up
            while not handled:
                assert loop.time() < deadline, "the restarted member waited for its dead predecessor"
                await asyncio.sleep(0.1)
        finally:
            await restarted.stop()
        assert handled == ["after"]


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

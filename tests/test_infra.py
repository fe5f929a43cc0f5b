"""The real infrastructure the launcher starts answers as the services will use it."""

from __future__ import annotations

import asyncio
import json
import smtplib
import time
import urllib.parse
import urllib.request
import uuid
from email.message import EmailMessage
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from cassandra.cluster import Cluster

from common.config import Settings
from devstack.stack import Stack


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


async def _new_topic(settings: Settings, name: str, partitions: int) -> str:
    topic = f"test.{name}.{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()
    return topic


async def test_kafka_produces_and_consumes_with_an_idempotent_producer(stack: Stack, settings: Settings) -> None:
    topic = await _new_topic(settings, "smoke", partitions=3)

    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        sent = {f"key-{i}".encode(): f"value-{i}".encode() for i in range(10)}
        for key, value in sent.items():
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.kafka_bootstrap, group_id=f"g-{topic}",
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    received: dict[bytes, bytes] = {}
    try:
        deadline = time.monotonic() + 30
        while len(received) < len(sent) and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                for record in records:
                    assert record.key is not None and record.value is not None
                    received[record.key] = record.value
        await consumer.commit()
    finally:
        await consumer.stop()
    assert received == sent


async def test_kafka_transactions_are_enabled(stack: Stack, settings: Settings) -> None:
    """The transaction log exists with replication factor 1, so a transactional producer commits."""
    topic = await _new_topic(settings, "txn", partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, transactional_id=f"t-{topic}")
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send_and_wait(topic, b"committed", key=b"k")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.kafka_bootstrap, isolation_level="read_committed",
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), timeout=30)
    finally:
        await consumer.stop()
    assert record.value == b"committed"


def test_cassandra_answers_cql(stack: Stack, settings: Settings) -> None:
    cluster = Cluster([settings.cassandra_host], port=settings.cassandra_port, protocol_version=5)
    try:
        session = cluster.connect()
        keyspace = f"test_{uuid.uuid4().hex[:8]}"
        session.execute(
            f"CREATE KEYSPACE {keyspace} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}"
        )
        session.execute(f"CREATE TABLE {keyspace}.t (k text PRIMARY KEY, v bigint)")
        session.execute(f"INSERT INTO {keyspace}.t (k, v) VALUES (%s, %s)", ("balance", 1234))
        row = session.execute(f"SELECT v FROM {keyspace}.t WHERE k = %s", ("balance",)).one()
        session.execute(f"DROP KEYSPACE {keyspace}")
    finally:
        cluster.shutdown()
    assert row.v == 1234


def test_mailpit_receives_smtp_and_answers_its_api(stack: Stack, settings: Settings) -> None:
    marker = uuid.uuid4().hex
    message = EmailMessage()
    message["From"] = "bank@simplebank.local"
    message["To"] = "someone@example.com"
    message["Subject"] = f"smoke {marker}"
    message.set_content(f"Verification code: {marker}")
    with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=5) as smtp:
        smtp.send_message(message)

    base = f"http://127.0.0.1:{settings.mailpit_http_port}/api/v1"
    query = urllib.parse.quote(f"subject:{marker}")
    deadline = time.monotonic() + 10
    found: list[dict[str, Any]] = []
    while not found and time.monotonic() < deadline:
        found = _get_json(f"{base}/search?query={query}")["messages"]
        time.sleep(0.2)
    assert len(found) == 1
    body = _get_json(f"{base}/message/{found[0]['ID']}")
    assert f"Verification code: {marker}" in body["Text"]


def test_prometheus_scrapes_every_service_and_envoy(stack: Stack, settings: Settings) -> None:
    url = f"http://127.0.0.1:{settings.prometheus_port}/api/v1/targets"
    wanted = {"svc_customer", "svc_account", "svc_transfer", "svc_notify", "envoy"}
    deadline = time.monotonic() + 40
    up: set[str] = set()
    while time.monotonic() < deadline:
        targets = _get_json(url)["data"]["activeTargets"]
        up = {t["labels"].get("service", t["labels"]["job"]) for t in targets if t["health"] == "up"}
        if wanted <= up:
            break
        time.sleep(1)
    assert wanted <= up, f"targets up: {sorted(up)}"
    # And the services' own RPC metrics are there: the health probes the launcher made count.
    query = urllib.parse.quote("sum by (service) (grpc_server_handled_total)")
    deadline = time.monotonic() + 20
    services: set[str] = set()
    while time.monotonic() < deadline and not {"svc_customer", "svc_account", "svc_transfer", "svc_notify"} <= services:
        result = _get_json(f"http://127.0.0.1:{settings.prometheus_port}/api/v1/query?query={query}")["data"]["result"]
        services = {r["metric"].get("service", "") for r in result}
        time.sleep(1)
    assert {"svc_customer", "svc_account", "svc_transfer", "svc_notify"} <= services


def test_each_service_applied_its_own_migrations(stack: Stack, settings: Settings) -> None:
    with psycopg.connect(settings.pg_conninfo) as conn:
        for schema, table in [("customer", "customers"), ("account", "accounts"),
                              ("transfer", "ledger_accounts"), ("notify", "customer_contacts")]:
            versions = conn.execute(f"SELECT version FROM {schema}.schema_migrations ORDER BY version").fetchall()
            assert versions and versions[0][0] == 1, schema
            exists = conn.execute("SELECT to_regclass(%s)", (f"{schema}.{table}",)).fetchone()
            assert exists is not None and exists[0] is not None, f"{schema}.{table}"

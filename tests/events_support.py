"""What the tests of the asynchronous half share: real customers with accounts, money moved by
REST through Envoy, statements (ListAccountActivity) and emails (Mailpit) waited for, MoneyMoved
events produced straight to Kafka as svc_transfer's relay does, and a topic read back."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from bank.events.v1 import events_pb2
from google.protobuf.message import Message
from prometheus_client.parser import text_string_to_metric_families

from common.config import Settings
from common.events import TOPICS, TRANSFER_TOPIC
from common.outbox import ensure_topics
from tests.support import Customer, login, mail_count, mailpit_messages, onboard, rest, until

T = TypeVar("T")
TELLER_USERNAME = "teller"
TELLER_PASSWORD = "teller-local-password"  # noqa: S105  # the local stack's documented default
WAIT_S = 20.0
CONVERGE_S = 90.0


@dataclass
class Holder:
    customer: Customer
    account_id: str

    @property
    def token(self) -> str:
        return self.customer.token

    @property
    def email(self) -> str:
        return self.customer.email


def teller_token(settings: Settings) -> str:
    return str(login(settings, TELLER_USERNAME, TELLER_PASSWORD)["access_token"])


def open_account(settings: Settings, customer: Customer, currency: str = "USD") -> str:
    response = rest(settings, "POST", "/v1/accounts", {"currency": currency}, token=customer.token)
    assert response.status == 200, response.body
    return str(response.body["account_id"])


def holder(settings: Settings, currency: str = "USD") -> Holder:
    """A verified customer with a session and one account."""
    customer = onboard(settings)
    return Holder(customer, open_account(settings, customer, currency))


def funded_people(settings: Settings, count: int, funds: int) -> list[Holder]:
    """count holders (onboarded at once), each account with `funds` USD deposited by a teller."""
    with ThreadPoolExecutor(count) as pool:
        people = list(pool.map(lambda _: holder(settings), range(count)))
    teller = teller_token(settings)
    for person in people:
        deposit(settings, teller, person.account_id, funds)
    return people


def deposit(settings: Settings, teller: str, account_id: str, amount: int, currency: str = "USD") -> dict[str, Any]:
    response = rest(settings, "POST", "/v1/deposits", {"request_id": uuid.uuid4().hex, "account_id": account_id,
                                                       "amount": amount, "currency": currency}, token=teller)
    assert response.status == 200, response.body
    return dict(response.body)


def withdraw(settings: Settings, teller: str, account_id: str, amount: int, currency: str = "USD") -> dict[str, Any]:
    response = rest(settings, "POST", "/v1/withdrawals", {"request_id": uuid.uuid4().hex, "account_id": account_id,
                                                          "amount": amount, "currency": currency}, token=teller)
    assert response.status == 200, response.body
    return dict(response.body)


def transfer(settings: Settings, source: Holder, target: Holder, amount: int, currency: str = "USD",
             description: str = "") -> dict[str, Any]:
    response = rest(settings, "POST", "/v1/transfers", {
        "request_id": uuid.uuid4().hex, "from_account_id": source.account_id, "to_account_id": target.account_id,
        "amount": amount, "currency": currency, "description": description}, token=source.token)
    assert response.status == 200, response.body
    return dict(response.body)


def activity_page(settings: Settings, token: str, account_id: str, page_size: int = 0, page_token: str = "") -> Any:
    query = f"?page_size={page_size}" + (f"&page_token={page_token}" if page_token else "")
    return rest(settings, "GET", f"/v1/accounts/{account_id}/activity{query}", token=token)


def statement(settings: Settings, token: str, account_id: str,
              unavailable_ok: bool = False) -> list[dict[str, Any]] | None:
    """Every line of the account's statement, newest first, page by page; None when the history
    store answers UNAVAILABLE (503) and unavailable_ok (it is coming back after a restart)."""
    lines: list[dict[str, Any]] = []
    page_token = ""
    for _ in range(100):
        response = activity_page(settings, token, account_id, 500, page_token)
        if unavailable_ok and response.status == 503:
            return None
        assert response.status == 200, response.body
        lines += response.body.get("activities", [])
        page_token = response.body.get("next_page_token", "")
        if not page_token:
            return lines
    raise AssertionError("more than 100 pages")


def statement_with(settings: Settings, token: str, account_id: str, count: int,
                   timeout_s: float = WAIT_S) -> list[dict[str, Any]]:
    def probe() -> list[dict[str, Any]] | None:
        lines = statement(settings, token, account_id)
        assert lines is not None
        assert len(lines) <= count, f"more statement lines than expected: {lines}"
        return lines if len(lines) == count else None
    return until(probe, f"{count} statement lines of {account_id}", timeout_s)


def mails(settings: Settings, email: str) -> list[dict[str, Any]]:
    return mailpit_messages(settings, f'to:"{email}"')


def mails_with(settings: Settings, email: str, count: int, timeout_s: float = WAIT_S) -> list[dict[str, Any]]:
    def probe() -> list[dict[str, Any]] | None:
        found = mails(settings, email)
        assert len(found) <= count, f"more emails than expected: {[m['Subject'] for m in found]}"
        return found if len(found) == count else None
    return until(probe, f"{count} emails to {email}", timeout_s, interval_s=0.2)


def ledger_movements(settings: Settings, person: Holder) -> list[dict[str, Any]]:
    """The account's committed movements, from the ledger (strongly consistent)."""
    movements: list[dict[str, Any]] = []
    page_token = ""
    for _ in range(100):
        query = "?page_size=500" + (f"&page_token={page_token}" if page_token else "")
        response = rest(settings, "GET", f"/v1/accounts/{person.account_id}/transfers{query}", token=person.token)
        assert response.status == 200, response.body
        movements += response.body.get("transfers", [])
        page_token = response.body.get("next_page_token", "")
        if not page_token:
            return movements
    raise AssertionError("more than 100 pages of transfers")


def account_balances(settings: Settings, person: Holder) -> tuple[int, int]:
    """(balance, available_balance) of the person's account, as GetAccount answers through Envoy:
    available is the balance less the account's PENDING holds as payer."""
    response = rest(settings, "GET", f"/v1/accounts/{person.account_id}", token=person.token)
    assert response.status == 200, response.body
    return int(response.body["balance"]), int(response.body["available_balance"])


def balance(settings: Settings, person: Holder) -> int:
    return account_balances(settings, person)[0]


def check_converged(settings: Settings, people: list[Holder], total: int, timeout_s: float = CONVERGE_S) -> None:
    """Every committed movement of the people (their accounts funded by one deposit each, then
    moving money only among themselves, `total` in all) once in each statement it touches and
    once in each inbox: nothing lost, nothing twice, and the balances add up."""
    for person in people:
        movements = ledger_movements(settings, person)
        ledger_ids = sorted(m["transfer_id"] for m in movements)

        def statement_done(person: Holder = person, ledger_ids: list[str] = ledger_ids) -> list[dict[str, Any]] | None:
            lines = statement(settings, person.token, person.account_id, unavailable_ok=True)
            if lines is None:
                return None  # Cassandra is back, the service's session not yet: ask again
            ids = sorted(line["transfer_id"] for line in lines)
            assert len(ids) == len(set(ids)), "a movement has two statement lines"
            assert set(ids) <= set(ledger_ids), "a statement line without a committed movement"
            return lines if ids == ledger_ids else None

        lines = until(statement_done, f"statement of {person.account_id} complete", timeout_s, interval_s=0.5)
        now = balance(settings, person)
        assert sum(int(line["amount"]) for line in lines) == now
        # The last movement applied left the balance as it is now. It is among the newest lines, but
        # not always the first: movements of one ledger batch share their commit time (to the
        # millisecond a statement keeps), and lines of equal time are ordered by their ids.
        newest = [line for line in lines if line["create_time"] == lines[0]["create_time"]]
        assert now in {int(line["balance_after"]) for line in newest}

        expected_mails = 1 + len(movements)  # the verification email, then one per movement

        def mails_done(person: Holder = person, expected: int = expected_mails) -> int | None:
            count = mail_count(settings, person.email)
            assert count <= expected, f"{person.email}: {count} emails for {expected} expected: a duplicate"
            return count if count == expected else None

        until(mails_done, f"{expected_mails} emails to {person.email}", timeout_s, interval_s=0.5)
    assert sum(balance(settings, p) for p in people) == total, "transfers between the people changed their total"


def mailpit_stats(settings: Settings) -> dict[str, int]:
    """Mailpit's counters since it started: SMTPAccepted, and SMTPIgnored (a message whose
    Message-ID it already holds: a second copy, dropped)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{settings.mailpit_http_port}/api/v1/info", timeout=5) as resp:
        return {key: int(value) for key, value in json.load(resp)["RuntimeStats"].items()}


def metric_samples(port: int) -> list[tuple[str, dict[str, str], float]]:
    """(sample name, labels, value) of every sample a process's /metrics serves; [] if it is down."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return []
    return [(sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text) for sample in family.samples]


def lag_measured(settings: Settings, service: str, index: int) -> dict[str, set[tuple[str, str]]]:
    """The (topic, partition) pairs whose lag one process of the service has measured, by consumer
    group (consumer_lag_records, common/consumer.py): a consumer that has not polled a partition
    yet has no series for it, and reads as no lag."""
    measured: dict[str, set[tuple[str, str]]] = {}
    for name, labels, _ in metric_samples(settings.metrics_port(service, index)):
        if name == "consumer_lag_records":
            measured.setdefault(labels["group"], set()).add((labels["topic"], labels["partition"]))
    return measured


def service_metric(settings: Settings, service: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples with these labels over every process of the service."""
    total = 0.0
    for index in range(settings.processes(service)):
        for sample, sample_labels, value in metric_samples(settings.metrics_port(service, index)):
            if sample == name and all(sample_labels.get(k) == v for k, v in labels.items()):
                total += value
    return total


TransferEvent = (events_pb2.MoneyMoved | events_pb2.HoldPlaced | events_pb2.HoldPosted | events_pb2.HoldVoided
                 | events_pb2.HoldExpired)


async def produce_transfer_events(settings: Settings, *events: TransferEvent) -> dict[int, int]:
    """Publish events in order as svc_transfer's relay does: keyed by transfer id, with its
    headers. Returns the last offset written on each partition."""
    await ensure_topics(settings)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    last: dict[int, int] = {}
    try:
        for event in events:
            headers = [("event_type", event.DESCRIPTOR.full_name.encode()), ("event_id", event.event_id.encode())]
            sent = await producer.send_and_wait(TRANSFER_TOPIC, event.SerializeToString(),
                                                key=event.transfer_id.encode(), headers=headers)
            last[sent.partition] = max(last.get(sent.partition, -1), sent.offset)
    finally:
        await producer.stop()
    return last


@contextlib.asynccontextmanager
async def scratch_topic(settings: Settings, name: str, partitions: int = 1) -> AsyncIterator[str]:
    """A topic of one test's own ("<name>.<random>"), deleted afterwards."""
    topic = f"{name}.{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions,
                                            replication_factor=settings.kafka_replication_factor)])
        yield topic
    finally:
        await admin.delete_topics([topic])
        await admin.close()


async def publish(settings: Settings, topic: str, *events: Message, key: bytes | None = None,
                  partition: int | None = None, headers: Sequence[tuple[str, bytes]] = ()) -> None:
    """Publish events in order, each with its event_type header (as the outbox relay writes it)."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for event in events:
            await producer.send_and_wait(topic, event.SerializeToString(), key=key, partition=partition,
                                         headers=[("event_type", event.DESCRIPTOR.full_name.encode()), *headers])
    finally:
        await producer.stop()


def _partitions(topic: str) -> list[TopicPartition]:
    return [TopicPartition(topic, partition) for partition in range(TOPICS[topic])]


def _reader(settings: Settings) -> AIOKafkaConsumer:
    """A consumer of no group (it commits nothing and disturbs no group) that sees every record:
    the relay writes no transactions (common/outbox.py), so read_uncommitted hides nothing."""
    return AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None, enable_auto_commit=False,
                            isolation_level="read_uncommitted", request_timeout_ms=30_000)


async def topic_ends(settings: Settings, topic: str) -> dict[TopicPartition, int]:
    """Where each partition of one of the bank's topics ends now: read_topic(since=...) then reads
    only what is published after."""
    consumer = _reader(settings)
    await consumer.start()
    try:
        return dict(await consumer.end_offsets(_partitions(topic)))
    finally:
        await consumer.stop()


async def read_topic(settings: Settings, topic: str, since: Mapping[TopicPartition, int] | None = None,
                     timeout_s: float = 30.0) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of one of the bank's topics from `since` (topic_ends; None: each partition's
    beginning) to where each partition ends when called, in log order per partition; fails the
    test when that is not read within timeout_s."""
    partitions = _partitions(topic)
    consumer = _reader(settings)
    records: list[ConsumerRecord[bytes, bytes]] = []
    await consumer.start()
    try:
        consumer.assign(partitions)
        # The seek first: a position not set yet when end_offsets is asked is then reset to the end.
        if since is None:
            await consumer.seek_to_beginning(*partitions)
        else:
            for tp in partitions:
                consumer.seek(tp, since[tp])
        ends = await consumer.end_offsets(partitions)
        deadline = time.monotonic() + timeout_s
        reading = {tp for tp in partitions if await consumer.position(tp) < ends[tp]}
        while reading:
            assert time.monotonic() < deadline, f"{topic} not read to its end within {timeout_s:.0f}s"
            for tp, batch in (await consumer.getmany(*reading, timeout_ms=1000, max_records=5000)).items():
                records += [record for record in batch if record.offset < ends[tp]]
            reading = {tp for tp in reading if await consumer.position(tp) < ends[tp]}
    finally:
        await consumer.stop()
    return records

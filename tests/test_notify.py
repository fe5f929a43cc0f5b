"""svc_notify end to end: customer events produced to Kafka here (as svc_customer's outbox relay
does) become verification emails in Mailpit and entries of ListNotifications, exactly once; hold
events (as svc_transfer's relay publishes them) a HOLD_RELEASED email to the payer per release."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import TypeVar

import grpc
import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from bank.events.v1 import events_pb2
from bank.notify.v1 import notify_pb2, notify_pb2_grpc

from common import cassandra
from common.config import Settings
from common.errors import reason_of
from common.events import CUSTOMER_TOPIC, TOPICS, TRANSFER_TOPIC
from devstack.stack import Stack
from tests.events_support import produce_transfer_events
from tests.support import mailpit_messages, mailpit_text, unique_email, until_async
from tests.tokens import TestTokens

WAIT_S = 15.0

Notification = notify_pb2.Notification


# --- helpers --------------------------------------------------------------------------------

async def _ensure_topic(settings: Settings) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(CUSTOMER_TOPIC, num_partitions=TOPICS[CUSTOMER_TOPIC], replication_factor=1)])
    except TopicAlreadyExistsError:
        pass
    finally:
        await admin.close()


async def _produce(settings: Settings, customer_id: str,
                   *events: events_pb2.CustomerRegistered | events_pb2.EmailVerified) -> None:
    """Publish events in order, keyed by the customer, with the relay's headers."""
    await _ensure_topic(settings)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for event in events:
            headers = [("event_type", event.DESCRIPTOR.full_name.encode()),
                       ("event_id", event.event_id.encode()),
                       ("request_id", f"test-notify-{uuid.uuid4().hex[:8]}".encode())]
            await producer.send_and_wait(CUSTOMER_TOPIC, event.SerializeToString(), key=customer_id.encode(),
                                         headers=headers)
    finally:
        await producer.stop()


def _registered(customer_id: str, email: str, code: str = "123456") -> events_pb2.CustomerRegistered:
    event = events_pb2.CustomerRegistered(event_id=str(uuid.uuid4()), customer_id=customer_id, email=email,
                                          full_name="Ada Lovelace", verification_code=code)
    event.create_time.GetCurrentTime()
    return event


def _verified(customer_id: str, email: str) -> events_pb2.EmailVerified:
    event = events_pb2.EmailVerified(event_id=str(uuid.uuid4()), customer_id=customer_id, email=email)
    event.create_time.GetCurrentTime()
    return event


@pytest.fixture
async def notify(stack: Stack, settings: Settings) -> AsyncIterator[notify_pb2_grpc.NotificationServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.notify_grpc_port}") as channel:
        yield notify_pb2_grpc.NotificationServiceStub(channel)


async def _list(stub: notify_pb2_grpc.NotificationServiceStub, token: str | None, page_size: int = 0,
                page_token: str = "") -> notify_pb2.ListNotificationsResponse:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    response: notify_pb2.ListNotificationsResponse = await stub.ListNotifications(
        notify_pb2.ListNotificationsRequest(page_size=page_size, page_token=page_token), metadata=metadata, timeout=5)
    return response


async def _mails(settings: Settings, email: str) -> list[dict[str, object]]:
    return await asyncio.to_thread(mailpit_messages, settings, f'to:"{email}"')


async def _sent(stub: notify_pb2_grpc.NotificationServiceStub, token: str, count: int) -> list[Notification]:
    """The customer's notifications once there are `count` of them, all SENT."""
    async def probe() -> list[Notification] | None:
        found = list((await _list(stub, token, page_size=500)).notifications)
        return found if len(found) == count and all(n.status == Notification.SENT for n in found) else None
    return await until_async(probe, f"{count} SENT notifications", WAIT_S)


# --- tests ----------------------------------------------------------------------------------

async def test_registration_event_sends_one_verification_email_and_lists_it(
        settings: Settings, notify: notify_pb2_grpc.NotificationServiceStub, tokens: TestTokens) -> None:
    customer_id, email = str(uuid.uuid4()), unique_email("notify")
    event = _registered(customer_id, email, code="482913")
    started = time.monotonic()
    await _produce(settings, customer_id, event)

    async def arrived() -> list[dict[str, object]] | None:
        return await _mails(settings, email) or None
    mails = await until_async(arrived, "verification email in Mailpit", WAIT_S)
    elapsed_s = time.monotonic() - started
    print(f"produce -> Mailpit: {elapsed_s * 1000:.0f} ms")

    assert len(mails) == 1
    mail = mails[0]
    assert mail["Subject"] == "Verify your email"
    assert mail["From"] == {"Name": "Simple Bank", "Address": "no-reply@simplebank.local"}
    text = await asyncio.to_thread(mailpit_text, settings, str(mail["ID"]))
    assert "Verification code: 482913" in text.splitlines()

    [notification] = await _sent(notify, tokens.customer(customer_id), 1)
    assert notification.kind == Notification.EMAIL_VERIFICATION
    assert notification.channel == Notification.EMAIL
    assert notification.recipient == email
    assert notification.subject == "Verify your email"
    assert notification.create_time.seconds > 0
    # The Message-ID derives from the notification, which derives from the event: the same for any copy.
    assert mail["MessageID"] == f"{notification.notification_id}@simplebank.local"


async def test_a_redelivered_event_sends_nothing_more(
        settings: Settings, notify: notify_pb2_grpc.NotificationServiceStub, tokens: TestTokens) -> None:
    customer_id, email = str(uuid.uuid4()), unique_email("notify-dup")
    registered = _registered(customer_id, email)
    # The same event twice (what the relay does after a crash), then a later event of the same
    # customer: same key, same partition, so once the projection shows it, both copies are done.
    await _produce(settings, customer_id, registered, registered, _verified(customer_id, email))

    def projection_verified() -> bool:
        with psycopg.connect(settings.pg_conninfo) as conn:
            row = conn.execute("SELECT email_verified FROM notify.customer_contacts WHERE customer_id = %s",
                               (customer_id,)).fetchone()
            return bool(row and row[0])

    async def verified() -> bool | None:
        return True if await asyncio.to_thread(projection_verified) else None
    await until_async(verified, "EmailVerified applied to the projection", WAIT_S)

    assert len(await _mails(settings, email)) == 1
    assert len(await _sent(notify, tokens.customer(customer_id), 1)) == 1

    # Once more, long after the first delivery: still nothing new.
    await _produce(settings, customer_id, registered, _verified(customer_id, email))
    await asyncio.sleep(1.0)
    assert len(await _mails(settings, email)) == 1
    assert len((await _list(notify, tokens.customer(customer_id))).notifications) == 1


async def test_unknown_and_malformed_events_are_skipped_not_blocking(
        settings: Settings, notify: notify_pb2_grpc.NotificationServiceStub, tokens: TestTokens) -> None:
    customer_id, email = str(uuid.uuid4()), unique_email("notify-skip")
    await _ensure_topic(settings)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        key = customer_id.encode()
        await producer.send_and_wait(CUSTOMER_TOPIC, b"whatever", key=key,
                                     headers=[("event_type", b"bank.events.v1.SomethingNew")])
        await producer.send_and_wait(CUSTOMER_TOPIC, b"\xff\xff not protobuf", key=key,
                                     headers=[("event_type", b"bank.events.v1.CustomerRegistered")])
        bad_id = _registered("not-a-uuid", email)
        await producer.send_and_wait(CUSTOMER_TOPIC, bad_id.SerializeToString(), key=key,
                                     headers=[("event_type", b"bank.events.v1.CustomerRegistered")])
    finally:
        await producer.stop()
    await _produce(settings, customer_id, _registered(customer_id, email))
    assert len(await _sent(notify, tokens.customer(customer_id), 1)) == 1
    assert len(await _mails(settings, email)) == 1


async def test_a_customer_sees_only_their_own_notifications(
        settings: Settings, notify: notify_pb2_grpc.NotificationServiceStub, tokens: TestTokens) -> None:
    owner, other = str(uuid.uuid4()), str(uuid.uuid4())
    await _produce(settings, owner, _registered(owner, unique_email("notify-own")))
    await _sent(notify, tokens.customer(owner), 1)

    assert list((await _list(notify, tokens.customer(other))).notifications) == []
    # A teller owns no notifications: an empty list, not an error.
    assert list((await _list(notify, tokens.teller())).notifications) == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _list(notify, None)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_notifications_page_newest_first(
        settings: Settings, notify: notify_pb2_grpc.NotificationServiceStub, tokens: TestTokens) -> None:
    customer_id = str(uuid.uuid4())
    token = tokens.customer(customer_id)
    events = [_registered(customer_id, unique_email(f"notify-page{i}")) for i in range(5)]
    await _produce(settings, customer_id, *events)
    everything = await _sent(notify, token, 5)
    # Newest first: the last event produced is the first listed.
    assert [n.recipient for n in everything] == [e.email for e in reversed(events)]
    times = [(n.create_time.seconds, n.create_time.nanos) for n in everything]
    assert times == sorted(times, reverse=True)

    pages: list[list[Notification]] = []
    page_token = ""
    for _ in range(10):
        page = await _list(notify, token, page_size=2, page_token=page_token)
        pages.append(list(page.notifications))
        page_token = page.next_page_token
        if not page_token:
            break
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [n.notification_id for p in pages for n in p] == [n.notification_id for n in everything]
    # Exactly a page's worth left: the last page still has no token.
    page = await _list(notify, token, page_size=5)
    assert len(page.notifications) == 5 and page.next_page_token == ""


@pytest.mark.parametrize(("page_size", "page_token", "reason"), [
    (-1, "", "INVALID_PAGE_SIZE"),
    (0, "not a token!", "INVALID_PAGE_TOKEN"),
    (0, "WyJ4IiwieSJd", "INVALID_PAGE_TOKEN"),  # base64url of ["x","y"]: the right shape, wrong types
    (0, "WzEsIjEyMyJd", "INVALID_PAGE_TOKEN"),  # [1,"123"]: not a notification id
])
async def test_bad_paging_input_is_invalid_argument(
        notify: notify_pb2_grpc.NotificationServiceStub, tokens: TestTokens,
        page_size: int, page_token: str, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _list(notify, tokens.customer(str(uuid.uuid4())), page_size=page_size, page_token=page_token)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(caught.value) == reason


# --- holds (API.md, "Holds"): only a release is emailed, to the payer; no consumer is held up --

HoldEvent = events_pb2.HoldPlaced | events_pb2.HoldPosted | events_pb2.HoldVoided | events_pb2.HoldExpired
HoldEventT = TypeVar("HoldEventT", bound=HoldEvent)
# Every consumer group of bank.transfer.v1: svc_notify's emails and svc_account's statements.
TRANSFER_GROUPS = ("svc_notify.transfer", "svc_account")


async def _committed_past(settings: Settings, group: str, last: dict[int, int]) -> bool:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    committed = {tp.partition: o.offset for tp, o in offsets.items() if tp.topic == TRANSFER_TOPIC}
    # A committed offset is the next one to read.
    return all(committed.get(partition, -1) > offset for partition, offset in last.items())


def _statement_months(settings: Settings, account_ids: list[str]) -> int:
    """svc_account's statement months of these accounts (read-only): a line writes its month."""
    cluster = cassandra.new_cluster(settings)
    try:
        session = cluster.connect()
        return sum(len(list(session.execute("SELECT month FROM bank_account.activity_months WHERE account_id = %s",
                                            (uuid.UUID(account_id),)))) for account_id in account_ids)
    finally:
        cluster.shutdown()


def _hold(event: HoldEventT, payer: str, payee: str, transfer_id: str) -> HoldEventT:
    """The event with its id and the hold's parties filled in (the fields all four share)."""
    event.event_id, event.transfer_id = str(uuid.uuid4()), transfer_id
    event.from_account_id, event.from_customer_id = PAYER_ACCOUNT, payer
    event.to_account_id, event.to_customer_id = PAYEE_ACCOUNT, payee
    return event


PAYER_ACCOUNT, PAYEE_ACCOUNT = str(uuid.uuid4()), str(uuid.uuid4())


async def test_released_holds_email_the_payer_once_each_and_no_consumer_is_held_up(
        settings: Settings, notify: notify_pb2_grpc.NotificationServiceStub, tokens: TestTokens) -> None:
    payer, payee = str(uuid.uuid4()), str(uuid.uuid4())
    payer_email, payee_email = unique_email("hold-payer"), unique_email("hold-payee")
    await _produce(settings, payer, _registered(payer, payer_email))
    await _produce(settings, payee, _registered(payee, payee_email))
    # Both known to the contacts projection (another topic) before their holds' events come.
    await _sent(notify, tokens.customer(payer), 1)
    await _sent(notify, tokens.customer(payee), 1)

    voided_id, expired_id, posted_id = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    placed = _hold(events_pb2.HoldPlaced(request_id="r-1", held_amount=1234, currency="EUR",
                                         description="deposit for the flat"), payer, payee, voided_id)
    placed.expire_time.GetCurrentTime()
    posted = _hold(events_pb2.HoldPosted(amount=500, held_amount=1234, currency="EUR"), payer, payee, posted_id)
    voided = _hold(events_pb2.HoldVoided(held_amount=1234, currency="EUR"), payer, payee, voided_id)
    expired = _hold(events_pb2.HoldExpired(held_amount=700, currency="EUR"), payer, payee, expired_id)
    expired.expire_time.FromSeconds(1_780_000_000)  # 2026-05-28 20:26:40 UTC
    for event in (posted, voided, expired):
        event.create_time.GetCurrentTime()
    # The void twice, as the relay does after a crash: the payer still gets one email for it.
    last = await produce_transfer_events(settings, placed, posted, voided, voided, expired)

    async def emails() -> list[dict[str, object]] | None:
        found = await _mails(settings, payer_email)
        return found if len(found) >= 3 else None
    await until_async(emails, "two HOLD_RELEASED emails to the payer", WAIT_S)
    for group in TRANSFER_GROUPS:
        async def done(group: str = group) -> bool | None:
            return True if await _committed_past(settings, group, last) else None
        await until_async(done, f"{group} committed past the hold events", WAIT_S, interval_s=0.5)

    payer_mails = await _mails(settings, payer_email)
    released = sorted(str(m["Subject"]) for m in payer_mails if m["Subject"] != "Verify your email")
    assert released == ["A hold of 12.34 EUR was released", "A hold of 7.00 EUR was released"]
    texts = [await asyncio.to_thread(mailpit_text, settings, str(m["ID"])) for m in payer_mails]
    assert any("voided by the payee" in t and f"Reference: {voided_id}" in t for t in texts)
    assert any("expired at 2026-05-28 20:26:40 UTC" in t and f"Reference: {expired_id}" in t for t in texts)
    assert len(await _mails(settings, payee_email)) == 1  # their verification only
    listed = await _sent(notify, tokens.customer(payer), 3)
    assert sorted(Notification.Kind.Name(n.kind) for n in listed) == ["EMAIL_VERIFICATION", "HOLD_RELEASED",
                                                                       "HOLD_RELEASED"]
    assert {n.recipient for n in listed} == {payer_email}
    # svc_account committed past them too, and a hold event is never a statement line.
    assert await asyncio.to_thread(_statement_months, settings, [PAYER_ACCOUNT, PAYEE_ACCOUNT]) == 0

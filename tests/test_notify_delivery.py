"""svc_notify's delivery rules where the fault must be made on purpose: the use case runs here,
in the test process, against the real Postgres, Cassandra and Mailpit, with a mail server
that refuses connections or an address that cannot be sent to."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from bank.events.v1 import events_pb2

from common import cassandra, db
from common.config import Settings
from common.consumer import EventMeta, StorageUnavailable
from common.retry import Backoff
from devstack.stack import Stack
from svc_notify import service
from svc_notify.mailer import Email, Mailer
from svc_notify.store import Store
from tests.support import mailpit_messages, unique_email


@pytest.fixture
async def store(stack: Stack, settings: Settings) -> AsyncIterator[Store]:
    pool = await db.open_pool(dataclasses.replace(settings, pg_pool_min=1, pg_pool_max=2), "notify")
    started = Store(settings, pool)
    await started.start()
    try:
        yield started
    finally:
        await started.stop()
        await pool.close()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _event(email: str) -> tuple[events_pb2.CustomerRegistered, EventMeta]:
    event = events_pb2.CustomerRegistered(event_id=str(uuid.uuid4()), customer_id=str(uuid.uuid4()), email=email,
                                          full_name="Grace Hopper", verification_code="777001")
    event.create_time.GetCurrentTime()
    return event, EventMeta(event.event_id, datetime.now(UTC))


async def _listed(store: Store, customer_id: str) -> list[tuple[str, int]]:
    found = await store.list_customer_notifications(uuid.UUID(customer_id), 10, None)
    return [(n.status, n.attempts) for n in found]


async def test_unreachable_mail_server_is_failed_after_bounded_tries_and_retried_on_redelivery(
        store: Store, settings: Settings) -> None:
    email = unique_email("notify-down")
    event, meta = _event(email)
    down = Mailer(dataclasses.replace(settings, smtp_port=_closed_port()))

    started = asyncio.get_running_loop().time()
    assert await service.customer_registered(store, down, event, meta) is service.Outcome.FAILED
    elapsed_s = asyncio.get_running_loop().time() - started
    tries = service.MAIL_BACKOFF.tries
    assert await _listed(store, event.customer_id) == [("FAILED", tries)]
    assert elapsed_s < service.MAIL_BACKOFF.worst_case_s(0.5)  # refused at once: only the pauses count

    # The same event again (a replay) with the mail server back: FAILED is retried, SENT is final.
    up = Mailer(settings)
    assert await service.customer_registered(store, up, event, meta) is service.Outcome.SENT
    assert await _listed(store, event.customer_id) == [("SENT", tries + 1)]
    assert await service.customer_registered(store, up, event, meta) is service.Outcome.DUPLICATE
    assert len(await asyncio.to_thread(mailpit_messages, settings, f'to:"{email}"')) == 1


async def test_an_address_that_cannot_be_sent_to_fails_at_once(store: Store, settings: Settings) -> None:
    event, meta = _event("victim@example.com\r\nBcc: everyone@example.com")
    assert await service.customer_registered(store, Mailer(settings), event, meta) is service.Outcome.FAILED
    assert await _listed(store, event.customer_id) == [("FAILED", 1)]  # permanent: no retries


async def test_storage_not_ready_means_the_event_is_not_done(stack: Stack, settings: Settings) -> None:
    pool = await db.open_pool(dataclasses.replace(settings, pg_pool_min=1, pg_pool_max=1), "notify")
    try:
        event, meta = _event(unique_email("notify-nostore"))
        with pytest.raises(StorageUnavailable):
            await service.customer_registered(Store(settings, pool), Mailer(settings), event, meta)  # never started
    finally:
        await pool.close()


def test_notification_ids_derive_from_the_event() -> None:
    event_id = str(uuid.uuid4())
    kind = service.Kind.EMAIL_VERIFICATION
    assert service.notification_id(event_id, kind) == service.notification_id(event_id, kind)
    assert service.notification_id(event_id, kind) != service.notification_id(str(uuid.uuid4()), kind)


def test_backoff_is_bounded() -> None:
    backoff = Backoff(tries=5, initial_s=0.2, max_s=5.0)
    assert [backoff.delay_s(n) <= min(5.0, 0.2 * 2 ** (n - 1)) for n in range(1, 10)] == [True] * 9
    assert backoff.delay_s(20) <= 5.0
    assert backoff.worst_case_s(1.0) == pytest.approx(5 * 1.0 + 0.2 + 0.4 + 0.8 + 1.6)


def test_cql_files_must_be_idempotent_and_name_their_keyspace(tmp_path: Path) -> None:
    good = "-- a comment; with a semicolon\nCREATE TABLE IF NOT EXISTS ks.t (k int PRIMARY KEY);\n"
    assert cassandra.cql_statements(good, "ks") == ["CREATE TABLE IF NOT EXISTS ks.t (k int PRIMARY KEY)"]
    for bad in ("CREATE TABLE ks.t (k int PRIMARY KEY);", "CREATE TABLE IF NOT EXISTS t (k int PRIMARY KEY);",
                "DROP TABLE IF EXISTS ks.t;"):
        with pytest.raises(ValueError):
            cassandra.cql_statements(bad, "ks")
    (tmp_path / "1_bad_name.cql").write_text(good)
    with pytest.raises(ValueError):
        cassandra.cql_files(tmp_path)


async def test_a_goodbye_that_fails_after_the_message_was_accepted_is_still_sent(settings: Settings) -> None:
    """The server took the message (250 after DATA), then answered QUIT with 421: the email is
    delivered, so the mailer must report it sent; as a transient failure it was sent again.
    The mailer keeps its connection for the next message, so the goodbye comes when it stops.
    A mail server that misbehaves on purpose cannot be had from Mailpit: a minimal SMTP
    dialogue on a local socket stands in for it."""
    accepted: list[bytes] = []

    async def dialogue(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 test ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                writer.write(b"250 test\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go on\r\n")
                await writer.drain()
                body = await reader.readuntil(b"\r\n.\r\n")
                accepted.append(body)
                writer.write(b"250 queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"421 closing in a bad mood\r\n")
                await writer.drain()
                break
            else:  # MAIL, RCPT, RSET, NOOP
                writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(dialogue, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        mailer = Mailer(dataclasses.replace(settings, smtp_host="127.0.0.1", smtp_port=port, smtp_user=""))
        await mailer.send(Email(recipient="grace@example.com", subject="s", text="t",
                                        message_id=f"{uuid.uuid4()}@test"))
        await mailer.stop()  # the kept connection says goodbye now: the 421 must change nothing
    finally:
        server.close()
        await server.wait_closed()
    assert len(accepted) == 1

"""The asynchronous half end to end: money moved through Envoy shows up in both parties'
statements (svc_account's Cassandra projection) and as one email per party (svc_notify);
duplicates change nothing; paging crosses months; a poisoned event is dead-lettered and can be
replayed."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest
from bank.events.v1 import events_pb2

from common import cassandra, dlq
from common.config import Settings
from common.events import TRANSFER_TOPIC, dlq_topic
from devstack.stack import Stack
from svc_notify.service import format_amount
from tests.events_support import (
    Holder,
    activity_page,
    deposit,
    holder,
    mails_with,
    produce_transfer_events,
    statement,
    statement_with,
    teller_token,
    transfer,
    withdraw,
)
from tests.support import mailpit_text, rest, until

MoneyMoved = events_pb2.MoneyMoved


@pytest.fixture(scope="module")
def pair(stack: Stack, settings: Settings) -> tuple[Holder, Holder]:
    return holder(settings), holder(settings)


@pytest.fixture(scope="module")
def teller(stack: Stack, settings: Settings) -> str:
    return teller_token(settings)


def test_amounts_are_written_in_the_currencys_minor_units() -> None:
    assert format_amount(1234, "USD") == "12.34 USD"
    assert format_amount(5, "EUR") == "0.05 EUR"
    assert format_amount(100, "GBP") == "1.00 GBP"
    assert format_amount(1234, "JPY") == "1234 JPY"
    assert format_amount(-1234, "USD") == "-12.34 USD"


def test_movements_reach_both_statements_and_each_party_gets_one_email(
        settings: Settings, pair: tuple[Holder, Holder], teller: str) -> None:
    alice, bob = pair
    deposited = deposit(settings, teller, alice.account_id, 10_000)
    moved = transfer(settings, alice, bob, 1234, description="rent, March")
    withdrawn = withdraw(settings, teller, bob.account_id, 200)

    alice_lines = statement_with(settings, alice.token, alice.account_id, 2)
    assert [(a["kind"], int(a["amount"]), int(a["balance_after"]), a["transfer_id"]) for a in alice_lines] == [
        ("TRANSFER_SENT", -1234, 8766, moved["transfer_id"]),
        ("DEPOSIT", 10_000, 10_000, deposited["transfer_id"]),
    ]
    assert alice_lines[0]["counterparty_account_id"] == bob.account_id
    assert alice_lines[0]["description"] == "rent, March"
    assert alice_lines[0]["currency"] == "USD"
    assert alice_lines[1].get("counterparty_account_id", "") == ""
    bob_lines = statement_with(settings, bob.token, bob.account_id, 2)
    assert [(a["kind"], int(a["amount"]), int(a["balance_after"]), a["transfer_id"]) for a in bob_lines] == [
        ("WITHDRAWAL", -200, 1034, withdrawn["transfer_id"]),
        ("TRANSFER_RECEIVED", 1234, 1234, moved["transfer_id"]),
    ]
    assert bob_lines[1]["counterparty_account_id"] == alice.account_id

    # The verification email, then one per movement of theirs.
    alice_mails = mails_with(settings, alice.email, 3)
    assert sorted(m["Subject"] for m in alice_mails) == ["Deposit of 100.00 USD", "Verify your email",
                                                         "You sent 12.34 USD"]
    bob_mails = mails_with(settings, bob.email, 3)
    assert sorted(m["Subject"] for m in bob_mails) == ["Verify your email", "Withdrawal of 2.00 USD",
                                                       "You received 12.34 USD"]
    sent = next(m for m in alice_mails if m["Subject"] == "You sent 12.34 USD")
    text = mailpit_text(settings, sent["ID"])
    assert moved["transfer_id"] in text and "Balance after: 87.66 USD" in text

    # The notification log lists them too.
    listed = until(lambda: _notifications(settings, bob.token, 3), "bob's notifications")
    assert {n["kind"] for n in listed} == {"EMAIL_VERIFICATION", "TRANSFER_RECEIVED", "WITHDRAWAL"}


def _notifications(settings: Settings, token: str, count: int) -> list[dict[str, object]] | None:
    response = rest(settings, "GET", "/v1/notifications?page_size=50", token=token)
    assert response.status == 200, response.body
    found = [n for n in response.body.get("notifications", []) if n.get("status") == "SENT"]
    return found if len(found) == count else None


def test_statements_are_private_and_tellers_see_any(settings: Settings, pair: tuple[Holder, Holder],
                                                    teller: str) -> None:
    alice, bob = pair
    refused = activity_page(settings, bob.token, alice.account_id)
    assert (refused.status, refused.reason) == (404, "ACCOUNT_NOT_FOUND")
    missing = activity_page(settings, alice.token, str(uuid.uuid4()))
    assert (missing.status, missing.reason) == (404, "ACCOUNT_NOT_FOUND")
    assert activity_page(settings, teller, alice.account_id).status == 200
    bad = activity_page(settings, alice.token, alice.account_id, page_token="not-a-token")
    assert (bad.status, bad.reason) == (400, "INVALID_PAGE_TOKEN")
    negative = activity_page(settings, alice.token, alice.account_id, page_size=-1)
    assert negative.status == 400


def _event(account_id: str, when: datetime, amount: int, event_id: str | None = None,
           transfer_id: str | None = None) -> events_pb2.MoneyMoved:
    event = MoneyMoved(event_id=event_id or str(uuid.uuid4()), transfer_id=transfer_id or str(uuid.uuid4()),
                       request_id=uuid.uuid4().hex, kind=MoneyMoved.DEPOSIT, to_account_id=account_id,
                       # A customer svc_notify never heard of: no email, the statement only.
                       to_customer_id=str(uuid.uuid4()), amount=amount, currency="USD", to_balance_after=amount)
    event.create_time.FromDatetime(when)
    return event


def _list_empty_months(settings: Settings, account_id: str, months: list[int]) -> None:
    cluster = cassandra.new_cluster(settings)
    try:
        session = cluster.connect()
        for month in months:
            session.execute("INSERT INTO bank_account.activity_months (account_id, month) VALUES (%s, %s)",
                            (uuid.UUID(account_id), month))
    finally:
        cluster.shutdown()


async def test_statement_pages_newest_first_across_months_and_a_duplicate_makes_no_second_line(
        settings: Settings, stack: Stack) -> None:
    owner = await asyncio.to_thread(holder, settings)
    months = [datetime(2025, m, d, 12, 0, tzinfo=UTC) for m, d in ((1, 5), (1, 20), (3, 1), (3, 2), (7, 9))]
    events = [_event(owner.account_id, when, 100 + i) for i, when in enumerate(months)]
    # The same event twice (a relay that published again after a crash), and out of order.
    await produce_transfer_events(settings, events[2], *events, events[2])
    lines = await asyncio.to_thread(statement_with, settings, owner.token, owner.account_id, 5)
    assert [int(a["amount"]) for a in lines] == [104, 103, 102, 101, 100]
    # Months listed without a line (a line write that failed for good after its month was
    # listed), more in a row than one read of months covers: pages step over them.
    await asyncio.to_thread(_list_empty_months, settings, owner.account_id, [202502, 202504, 202505, 202506])

    # Page by two: the pages join up exactly, across the months, with no line twice.
    paged: list[int] = []
    page_token = ""
    for _ in range(10):
        response = await asyncio.to_thread(activity_page, settings, owner.token, owner.account_id, 2, page_token)
        assert response.status == 200, response.body
        assert len(response.body["activities"]) <= 2
        paged += [int(a["amount"]) for a in response.body["activities"]]
        page_token = response.body.get("next_page_token", "")
        if not page_token:
            break
    assert paged == [104, 103, 102, 101, 100]
    again = await asyncio.to_thread(statement, settings, owner.token, owner.account_id)
    assert again is not None and len(again) == 5


async def test_a_poisoned_event_is_dead_lettered_by_each_consumer_and_can_be_replayed(
        settings: Settings, stack: Stack) -> None:
    poisoned = MoneyMoved(event_id=str(uuid.uuid4()), transfer_id=str(uuid.uuid4()), kind=MoneyMoved.TRANSFER,
                          from_account_id="not-an-account", to_account_id=str(uuid.uuid4()),
                          from_customer_id="not-a-customer", to_customer_id=str(uuid.uuid4()),
                          amount=5, currency="USD")
    topic = dlq_topic(TRANSFER_TOPIC)
    start = await dlq.end_offsets(settings, topic)  # what earlier runs parked stays out of the way
    await produce_transfer_events(settings, poisoned)

    async def parked(count: int) -> list[dict[str, object]]:
        for _ in range(100):
            rows = [r for r in await dlq.list_records(settings, topic, dlq.LIMIT_MAX, after=start)
                    if r["event_id"] == poisoned.event_id]
            if len(rows) >= count:
                return rows
            await asyncio.sleep(0.2)
        raise AssertionError(f"{poisoned.event_id} not dead-lettered {count} times")

    rows = await parked(2)
    assert {r["group"] for r in rows} == {"svc_account", "svc_notify.transfer"}
    assert all("not a UUID" in str(r["error"]) for r in rows)
    assert all(str(r["source"]).startswith(f"{TRANSFER_TOPIC}/") for r in rows)

    replayed = await dlq.replay(settings, topic, dlq.LIMIT_MAX)
    # One copy goes back, however many groups parked it (or every replay would double the copies).
    assert sum(1 for r in replayed if r["event_id"] == poisoned.event_id) == 1
    # Still poisoned: each consumer parks it again, once.
    assert len(await parked(4)) == 4
    # Replayed records are not replayed a second time.
    assert not [r for r in await dlq.replay(settings, topic, dlq.LIMIT_MAX)
                if r["event_id"] == poisoned.event_id and r["offset"] in {x["offset"] for x in replayed}]

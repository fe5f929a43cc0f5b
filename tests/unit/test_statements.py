"""svc_account's statements: the projection of MoneyMoved (service.money_moved) and the
reading of statement pages across months, against the fake history store."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from bank.events.v1 import events_pb2

from common.consumer import BadEvent, EventMeta, StorageUnavailable
from common.retry import Backoff
from svc_account import service
from tests.unit.fakes import FakeActivityStore

MoneyMoved = events_pb2.MoneyMoved
META = EventMeta("e-1", datetime(2026, 3, 1, tzinfo=UTC))


def moved(kind: int = MoneyMoved.TRANSFER, amount: int = 25, when: datetime | None = None,
          source: uuid.UUID | None = None, target: uuid.UUID | None = None) -> events_pb2.MoneyMoved:
    event = MoneyMoved(transfer_id=str(uuid.uuid4()), kind=kind, amount=amount, currency="USD",  # type: ignore[arg-type]
                       from_account_id=str(source or uuid.uuid4()), to_account_id=str(target or uuid.uuid4()),
                       from_balance_after=75, to_balance_after=25, description="rent")
    if when is not None:
        event.create_time.FromDatetime(when)
    return event


def test_a_transfer_is_a_line_on_each_side_that_sums_to_zero() -> None:
    event = moved()
    sent, received = service.statement_lines(event, META)
    assert (sent.kind, sent.amount, sent.balance_after) == ("TRANSFER_SENT", -25, 75)
    assert (received.kind, received.amount, received.balance_after) == ("TRANSFER_RECEIVED", 25, 25)
    assert sent.amount + received.amount == 0
    assert sent.create_time == META.fallback_time  # no create_time in the event: the record's time
    assert sent.activity_id != received.activity_id
    assert service.statement_lines(event, META) == [sent, received]  # ids derived: redelivery changes nothing


def test_a_deposit_or_withdrawal_is_one_line_on_the_customer_side() -> None:
    [deposit] = service.statement_lines(moved(MoneyMoved.DEPOSIT), META)
    [withdrawal] = service.statement_lines(moved(MoneyMoved.WITHDRAWAL), META)
    assert (deposit.kind, deposit.amount, deposit.counterparty_account_id) == ("DEPOSIT", 25, "")
    assert (withdrawal.kind, withdrawal.amount) == ("WITHDRAWAL", -25)


@pytest.mark.parametrize("event", [
    moved(amount=0),
    MoneyMoved(transfer_id="t", kind=MoneyMoved.TRANSFER, amount=1, currency="USD", from_account_id="x",
               to_account_id=str(uuid.uuid4())),
    MoneyMoved(transfer_id="", kind=MoneyMoved.DEPOSIT, amount=1, currency="USD", to_account_id=str(uuid.uuid4())),
])
def test_an_event_that_cannot_be_a_line_is_a_bad_event(event: events_pb2.MoneyMoved) -> None:
    with pytest.raises(BadEvent):
        service.statement_lines(event, META)


async def test_the_projection_retries_a_slow_store_then_says_storage_is_down(
        activity: FakeActivityStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "STORAGE_BACKOFF", Backoff(tries=3, initial_s=0.001, max_s=0.001))
    activity.failures_to_come = 2
    assert await service.money_moved(activity, moved(), META) == service.Outcome.APPLIED
    assert (activity.writes, len(activity.lines)) == (3, 2)
    activity.failures_to_come = 3
    with pytest.raises(StorageUnavailable):
        await service.money_moved(activity, moved(), META)
    assert len(activity.lines) == 2


async def test_statement_pages_walk_back_across_months_without_gaps(activity: FakeActivityStore) -> None:
    account = uuid.uuid4()
    for month in (1, 2, 5, 11):  # months with no line between them are skipped
        for day in (3, 9):
            await service.money_moved(activity, moved(MoneyMoved.DEPOSIT, amount=month * 100 + day, target=account,
                                                      when=datetime(2025, month, day, tzinfo=UTC)), META)
    pages: list[list[int]] = []
    after = None
    for _ in range(10):  # bounded: 8 lines in pages of 3
        lines = await service._read_statement(activity, account, 4, after)
        page = lines[:3]
        pages.append([line.amount for line in page])
        if len(lines) <= 3:
            break
        last = page[-1]
        after = (last.month, (last.create_time, last.activity_id))
    assert pages == [[1109, 1103, 509], [503, 209, 203], [109, 103]]

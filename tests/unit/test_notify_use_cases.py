"""svc_notify's use cases (service.py) against fakes of its store and mailer: each event's email
sent once (a redelivered event sends nothing), failures of the mail server and of storage,
the contacts projection, movements' emails and the customer's list of notifications."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from bank.events.v1 import events_pb2

from common.auth import Caller, Role
from common.consumer import BadEvent, EventMeta, StorageUnavailable
from common.errors import DomainError
from common.retry import Backoff
from svc_notify import consumer, service
from svc_notify.mailer import PermanentMailError, TransientMailError
from svc_notify.service import Outcome, Status
from tests.unit.fakes import FakeMailer, FakeNotifyStore

WHEN = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MoneyMoved = events_pb2.MoneyMoved


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same number of tries, without their pauses."""
    monkeypatch.setattr(service, "MAIL_BACKOFF", Backoff(tries=service.MAIL_BACKOFF.tries, initial_s=0.001,
                                                         max_s=0.001))
    monkeypatch.setattr(service, "STORAGE_BACKOFF", Backoff(tries=service.STORAGE_BACKOFF.tries, initial_s=0.001,
                                                            max_s=0.001))


@pytest.fixture
def store() -> FakeNotifyStore:
    return FakeNotifyStore()


@pytest.fixture
def mailer() -> FakeMailer:
    return FakeMailer()


def meta(event_id: str | None = None, when: datetime = WHEN) -> EventMeta:
    return EventMeta(event_id or str(uuid.uuid4()), when)


def registration(customer_id: uuid.UUID | None = None, email: str = "ada@example.com",
                 code: str = "123456") -> events_pb2.CustomerRegistered:
    return events_pb2.CustomerRegistered(event_id=str(uuid.uuid4()), customer_id=str(customer_id or uuid.uuid4()),
                                         email=email, full_name="Ada Lovelace", verification_code=code)


# --- a customer's own emails: once each ---------------------------------------------------------

async def test_a_registration_is_projected_and_its_code_emailed_once(store: FakeNotifyStore,
                                                                    mailer: FakeMailer) -> None:
    customer_id = uuid.uuid4()
    event, first = registration(customer_id, code="424242"), meta()
    assert await service.customer_registered(store, mailer, event, first) == Outcome.SENT
    [email] = mailer.sent
    assert (email.recipient, email.subject) == ("ada@example.com", service.VERIFICATION_SUBJECT)
    assert "Verification code: 424242" in email.text and email.text.startswith("Hello Ada Lovelace,")
    assert store.contacts[customer_id][:3] == ("ada@example.com", "Ada Lovelace", False)
    [record] = store.records.values()
    assert (record.status, record.attempts, record.kind) == (Status.SENT, 1, "EMAIL_VERIFICATION")
    assert email.message_id.startswith(str(record.notification_id))
    # Delivered again (at least once from Kafka): nothing is sent, and the list is repaired.
    store.lists.clear()
    assert await service.customer_registered(store, mailer, event, first) == Outcome.DUPLICATE
    assert len(mailer.sent) == 1 and list(store.lists[customer_id].values()) == [record]


@pytest.mark.parametrize("event", [
    registration().__class__(customer_id="not-a-uuid", email="a@b.c", verification_code="1"),
    registration(email="no-at-sign"),
    registration(email="a" * 400 + "@example.com"),
    registration(code=""),
])
async def test_a_registration_event_that_cannot_be_acted_on_is_a_bad_event(
        store: FakeNotifyStore, mailer: FakeMailer, event: events_pb2.CustomerRegistered) -> None:
    with pytest.raises(BadEvent):
        await service.customer_registered(store, mailer, event, meta())
    assert mailer.sent == [] and store.records == {}


async def test_a_mail_server_that_recovers_within_the_tries_gets_the_email_sent(store: FakeNotifyStore,
                                                                                mailer: FakeMailer) -> None:
    mailer.failures = [TransientMailError("421 busy")] * (service.MAIL_BACKOFF.tries - 1)
    assert await service.customer_registered(store, mailer, registration(), meta()) == Outcome.SENT
    [record] = store.records.values()
    assert (record.status, record.attempts, len(mailer.sent)) == (Status.SENT, service.MAIL_BACKOFF.tries, 1)


async def test_a_refused_email_is_recorded_failed_at_once_and_not_tried_again(store: FakeNotifyStore,
                                                                             mailer: FakeMailer) -> None:
    mailer.failures = [PermanentMailError("550 no such mailbox")]
    assert await service.customer_registered(store, mailer, registration(), meta()) == Outcome.FAILED
    [record] = store.records.values()
    assert (record.status, record.attempts, mailer.attempts) == (Status.FAILED, 1, 1)


async def test_a_mail_outage_leaves_the_event_undone_and_its_redelivery_sends(store: FakeNotifyStore,
                                                                              mailer: FakeMailer) -> None:
    tries = service.MAIL_BACKOFF.tries
    event, first = registration(), meta()
    mailer.failures = [TransientMailError("connection refused")] * tries
    with pytest.raises(service.MailUnavailable):
        await service.customer_registered(store, mailer, event, first, redeliver_on_mail_outage=True)
    [record] = store.records.values()
    assert (record.status, record.attempts) == (Status.FAILED, tries)  # recorded before the event is given back
    assert await service.customer_registered(store, mailer, event, first,
                                             redeliver_on_mail_outage=True) == Outcome.SENT
    [record] = store.records.values()
    assert (record.status, record.attempts, len(mailer.sent)) == (Status.SENT, tries + 1, 1)
    # Without redelivery (a caller that cannot give the event back), the outage is a FAILED record.
    mailer.failures = [TransientMailError("connection refused")] * tries
    assert await service.customer_registered(store, mailer, registration(), meta()) == Outcome.FAILED


async def test_storage_is_retried_then_reported_down_and_nothing_is_sent(store: FakeNotifyStore,
                                                                         mailer: FakeMailer) -> None:
    store.failures_to_come = service.STORAGE_BACKOFF.tries - 1
    assert await service.customer_registered(store, mailer, registration(), meta()) == Outcome.SENT
    store.failures_to_come = service.STORAGE_BACKOFF.tries
    with pytest.raises(StorageUnavailable):
        await service.customer_registered(store, mailer, registration(), meta())
    assert len(mailer.sent) == 1


async def test_the_contacts_projection_keeps_the_newest_event(store: FakeNotifyStore, mailer: FakeMailer) -> None:
    customer_id = uuid.uuid4()
    await service.customer_registered(store, mailer, registration(customer_id), meta(when=WHEN))
    verified = events_pb2.EmailVerified(event_id="v", customer_id=str(customer_id), email="ada@example.com")
    verified.create_time.FromDatetime(WHEN + timedelta(minutes=1))
    assert await service.email_verified(store, verified, meta()) == Outcome.APPLIED
    assert await service.email_verified(store, verified, meta()) == Outcome.STALE
    assert store.contacts[customer_id][2] is True
    # A registration older than what the row reflects changes nothing, but its code is still sent.
    assert await service.customer_registered(store, mailer, registration(customer_id, "old@example.com"),
                                             meta(when=WHEN)) == Outcome.SENT
    assert store.contacts[customer_id][0] == "ada@example.com"


async def test_recovery_emails_go_to_the_address_each_event_names(store: FakeNotifyStore, mailer: FakeMailer) -> None:
    customer_id = str(uuid.uuid4())
    reset = events_pb2.PasswordResetRequested(customer_id=customer_id, email="ada@example.com", reset_code="777777")
    changed = events_pb2.PasswordChanged(customer_id=customer_id, email="ada@example.com",
                                         method=events_pb2.PasswordChanged.RESET)
    asked = events_pb2.EmailChangeRequested(customer_id=customer_id, new_email="new@example.com",
                                            verification_code="888888")
    moved = events_pb2.EmailChanged(customer_id=customer_id, old_email="ada@example.com", new_email="new@example.com")
    resent = events_pb2.VerificationCodeResent(customer_id=customer_id, email="ada@example.com", full_name="",
                                               verification_code="999999")
    st, ml = store, mailer
    assert await service.password_reset_requested(st, ml, reset, meta()) == Outcome.SENT
    assert await service.password_changed(st, ml, changed, meta()) == Outcome.SENT
    assert await service.email_change_requested(st, ml, asked, meta()) == Outcome.SENT
    assert await service.email_changed(st, ml, moved, meta()) == Outcome.SENT
    assert await service.verification_code_resent(st, ml, resent, meta()) == Outcome.SENT
    assert [(e.recipient, e.subject) for e in mailer.sent] == [
        ("ada@example.com", service.PASSWORD_RESET_SUBJECT), ("ada@example.com", service.PASSWORD_CHANGED_SUBJECT),
        ("new@example.com", service.VERIFICATION_SUBJECT), ("ada@example.com", service.EMAIL_CHANGED_SUBJECT),
        ("ada@example.com", service.VERIFICATION_SUBJECT)]
    assert "777777" in mailer.sent[0].text and "with a reset code" in mailer.sent[1].text
    assert "new@example.com" in mailer.sent[3].text  # the old address is told where mail goes now
    assert store.contacts[uuid.UUID(customer_id)][:3] == ("new@example.com", "", True)
    with pytest.raises(BadEvent):
        await service.password_reset_requested(st, ml, events_pb2.PasswordResetRequested(
            customer_id=customer_id, email="ada@example.com", reset_code="12ab"), meta())


# --- movements ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("amount", "currency", "text"), [
    (1234, "USD", "12.34 USD"), (5, "EUR", "0.05 EUR"), (-1234, "GBP", "-12.34 GBP"), (1234, "JPY", "1234 JPY")])
def test_amounts_read_as_people_write_them(amount: int, currency: str, text: str) -> None:
    assert service.format_amount(amount, currency) == text


def test_an_amount_in_an_unsupported_currency_is_a_bad_event() -> None:
    with pytest.raises(BadEvent):
        service.format_amount(1, "XYZ")


def transfer(source: uuid.UUID, target: uuid.UUID, kind: int = MoneyMoved.TRANSFER,
             amount: int = 2500) -> events_pb2.MoneyMoved:
    return MoneyMoved(transfer_id="t-1", kind=kind, amount=amount, currency="USD",  # type: ignore[arg-type]
                      from_account_id="acc-a", to_account_id="acc-b", from_customer_id=str(source),
                      to_customer_id=str(target), from_balance_after=7500, to_balance_after=2500, description="rent")


async def test_a_transfer_tells_both_sides_once_each(store: FakeNotifyStore, mailer: FakeMailer) -> None:
    ada, bob = uuid.uuid4(), uuid.uuid4()
    store.contacts.update({ada: ("ada@example.com", "Ada", True, WHEN), bob: ("bob@example.com", "Bob", True, WHEN)})
    event, first = transfer(ada, bob), meta()
    assert await service.money_moved(store, mailer, event, first) == Outcome.SENT
    by_recipient = {e.recipient: e for e in mailer.sent}
    assert by_recipient["ada@example.com"].subject == "You sent 25.00 USD"
    assert "Balance after: 75.00 USD" in by_recipient["ada@example.com"].text
    assert by_recipient["bob@example.com"].subject == "You received 25.00 USD"
    assert "Balance after: 25.00 USD" in by_recipient["bob@example.com"].text
    assert await service.money_moved(store, mailer, event, first) == Outcome.DUPLICATE
    assert len(mailer.sent) == 2


async def test_a_party_without_a_contact_gets_nothing_and_the_other_still_does(store: FakeNotifyStore,
                                                                             mailer: FakeMailer) -> None:
    ada, stranger = uuid.uuid4(), uuid.uuid4()
    store.contacts[ada] = ("ada@example.com", "Ada", True, WHEN)
    assert await service.money_moved(store, mailer, transfer(ada, stranger), meta()) == Outcome.SENT
    assert [e.recipient for e in mailer.sent] == ["ada@example.com"]
    assert await service.money_moved(store, mailer, transfer(stranger, stranger, MoneyMoved.DEPOSIT),
                                     meta()) == Outcome.NO_CONTACT
    with pytest.raises(BadEvent):
        await service.money_moved(store, mailer, transfer(ada, ada, amount=0), meta())


async def test_a_deposit_tells_its_owner_only(store: FakeNotifyStore, mailer: FakeMailer) -> None:
    ada = uuid.uuid4()
    store.contacts[ada] = ("ada@example.com", "Ada", True, WHEN)
    event = MoneyMoved(transfer_id="t-2", kind=MoneyMoved.DEPOSIT, amount=100, currency="JPY", to_account_id="acc-b",
                       to_customer_id=str(ada), to_balance_after=100)
    assert await service.money_moved(store, mailer, event, meta()) == Outcome.SENT
    [email] = mailer.sent
    assert (email.subject, "Balance after: 100 JPY" in email.text) == ("Deposit of 100 JPY", True)


# --- holds --------------------------------------------------------------------------------------

def voided(payer: uuid.UUID, payee: uuid.UUID, held_amount: int = 1234) -> events_pb2.HoldVoided:
    return events_pb2.HoldVoided(event_id=str(uuid.uuid4()), transfer_id="h-1", from_account_id="acc-a",
                                 from_customer_id=str(payer), to_account_id="acc-b", to_customer_id=str(payee),
                                 held_amount=held_amount, currency="EUR")


def expired(payer: uuid.UUID, payee: uuid.UUID) -> events_pb2.HoldExpired:
    event = events_pb2.HoldExpired(event_id=str(uuid.uuid4()), transfer_id="h-2", from_account_id="acc-a",
                                   from_customer_id=str(payer), to_account_id="acc-b", to_customer_id=str(payee),
                                   held_amount=500, currency="USD")
    event.expire_time.FromDatetime(WHEN)
    event.create_time.FromDatetime(WHEN + timedelta(seconds=3))
    return event


def both_known(store: FakeNotifyStore) -> tuple[uuid.UUID, uuid.UUID]:
    payer, payee = uuid.uuid4(), uuid.uuid4()
    store.contacts.update({payer: ("ada@example.com", "Ada", True, WHEN), payee: ("bob@example.com", "Bob", True, WHEN)})
    return payer, payee


async def test_a_voided_hold_tells_the_payer_once_and_the_payee_nothing(store: FakeNotifyStore,
                                                                       mailer: FakeMailer) -> None:
    payer, payee = both_known(store)
    event, first = voided(payer, payee), meta()
    assert await service.hold_released(store, mailer, event, first) == Outcome.SENT
    [email] = mailer.sent
    assert (email.recipient, email.subject) == ("ada@example.com", "A hold of 12.34 EUR was released")
    assert "voided by the payee" in email.text and "Reference: h-1" in email.text
    [record] = store.records.values()
    assert (record.kind, record.customer_id, record.status) == ("HOLD_RELEASED", payer, Status.SENT)
    assert record.notification_id == service.notification_id(first.event_id, service.Kind.HOLD_RELEASED)
    # Redelivered: nothing more is sent, and the payer's list still holds it once.
    assert await service.hold_released(store, mailer, event, first) == Outcome.DUPLICATE
    assert len(mailer.sent) == 1
    page = await service.list_notifications(store, Caller(str(payer), Role.CUSTOMER), 10, "")
    assert [n.kind for n in page.notifications] == ["HOLD_RELEASED"]
    assert (await service.list_notifications(store, Caller(str(payee), Role.CUSTOMER), 10, "")).notifications == []


async def test_an_expired_hold_tells_the_payer_once_when_it_lapsed(store: FakeNotifyStore,
                                                                  mailer: FakeMailer) -> None:
    payer, payee = both_known(store)
    event, first = expired(payer, payee), meta()
    assert await service.hold_released(store, mailer, event, first) == Outcome.SENT
    assert await service.hold_released(store, mailer, event, first) == Outcome.DUPLICATE
    [email] = mailer.sent
    assert (email.recipient, email.subject) == ("ada@example.com", "A hold of 5.00 USD was released")
    assert "expired at 2026-03-01 12:00:00 UTC" in email.text
    [record] = store.records.values()
    assert (record.kind, record.customer_id) == ("HOLD_RELEASED", payer)


async def test_a_release_for_an_unknown_payer_or_with_a_bad_field_sends_nothing(store: FakeNotifyStore,
                                                                                mailer: FakeMailer) -> None:
    _, payee = both_known(store)
    assert await service.hold_released(store, mailer, voided(uuid.uuid4(), payee), meta()) == Outcome.NO_CONTACT
    payer, _ = both_known(store)
    for bad in [voided(payer, payee, held_amount=0), events_pb2.HoldVoided(from_customer_id="x", held_amount=1,
                                                                          currency="EUR")]:
        with pytest.raises(BadEvent):
            await service.hold_released(store, mailer, bad, meta())
    assert mailer.sent == [] and store.records == {}


async def test_only_released_holds_are_routed_to_an_email(store: FakeNotifyStore, mailer: FakeMailer) -> None:
    """HoldPlaced and HoldPosted have no route in either group: common/consumer.py commits past
    them and nobody is emailed (a post's MoneyMoved brings the transfer emails)."""
    by_group = consumer.routes(store, mailer)
    transfer_routes = by_group[consumer.TRANSFER_GROUP_ID]
    assert set(transfer_routes) == {"bank.events.v1.MoneyMoved", "bank.events.v1.HoldVoided",
                                    "bank.events.v1.HoldExpired"}
    assert not any(name.startswith("bank.events.v1.Hold") for name in by_group[consumer.GROUP_ID])
    payer, payee = both_known(store)
    for event in [voided(payer, payee), expired(payer, payee)]:
        route = transfer_routes[event.DESCRIPTOR.full_name]
        assert await route.handler(route.message_type.FromString(event.SerializeToString()), meta()) == Outcome.SENT
    assert [e.recipient for e in mailer.sent] == ["ada@example.com"] * 2


# --- ListNotifications --------------------------------------------------------------------------

async def test_a_customer_lists_their_own_notifications_newest_first_in_pages(store: FakeNotifyStore,
                                                                             mailer: FakeMailer) -> None:
    ada = uuid.uuid4()
    for n in range(5):
        await service.customer_registered(store, mailer, registration(ada, code=f"00000{n}"), meta())
    await service.customer_registered(store, mailer, registration(), meta())  # someone else's
    caller = Caller(str(ada), Role.CUSTOMER)
    seen, token = [], ""
    for _ in range(5):  # bounded: 5 notifications in pages of 2
        page = await service.list_notifications(store, caller, 2, token)
        seen += page.notifications
        token = page.next_page_token
        if not token:
            break
    assert len({n.notification_id for n in seen}) == 5 and all(n.customer_id == ada for n in seen)
    assert [n.create_time for n in seen] == sorted((n.create_time for n in seen), reverse=True)
    teller = await service.list_notifications(store, Caller("t", Role.TELLER), 2, "")
    assert (teller.notifications, teller.next_page_token) == ([], "")
    with pytest.raises(DomainError) as bad:
        await service.list_notifications(store, caller, 2, "garbage")
    assert bad.value.reason == "INVALID_PAGE_TOKEN"


async def test_an_unreadable_list_is_unavailable_not_an_internal_error(store: FakeNotifyStore) -> None:
    store.failures_to_come = 1
    with pytest.raises(DomainError) as down:
        await service.list_notifications(store, Caller(str(uuid.uuid4()), Role.CUSTOMER), 10, "")
    assert down.value.reason == "NOTIFICATIONS_UNAVAILABLE"

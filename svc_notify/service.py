"""svc_notify's use cases: react to customer events, list a customer's notifications.

Delivery is at-least-once from Kafka and exactly-once in effect for the customer: each
notification has an id derived from its event's id and its kind, and its record in Cassandra
says whether it was sent:
  1. Read the record. SENT: a duplicate, nothing is sent.
  2. Send, with bounded retries for transient failures.
  3. Record SENT, or FAILED when the retries ran out or the server refused for good; the
     consumer then moves on to the next event.
No two handlers ever work on one event at once (common/consumer.py: one member per partition,
a rebalance waits for the batch in hand, copies of an event in one batch are handled once), and
the consumer commits an event's offset only after step 3, so a plain read at LOCAL_QUORUM sees
every earlier handler's record: no lightweight transaction is needed (docs/decisions/0014).
The one window left is a crash (or storage failure) between the mail server's acceptance and
step 3: the event comes again, finds no SENT record and sends again. That second copy carries
the same Message-ID, so mail clients can recognise it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Protocol, TypeVar

from bank.events.v1 import events_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from common import auth, cassandra, ids, pagination
from common.consumer import BadEvent, EventMeta, StorageUnavailable
from common.errors import refused
from common.logging import fields
from common.retry import Backoff, retry
from svc_notify import mailer
from svc_notify.mailer import Email, PermanentMailError, TransientMailError
from svc_notify.store import TRANSIENT_ERRORS, UNAVAILABLE_ERRORS, Notification

log = logging.getLogger("notify")

T = TypeVar("T")


class Notifications(Protocol):
    """The contacts projection and the notification log: store.Store, or the fake of tests/unit."""

    async def upsert_registered_contact(self, customer_id: uuid.UUID, email: str, full_name: str,
                                        event_time: datetime) -> bool: ...

    async def mark_contact_verified(self, customer_id: uuid.UUID, email: str, event_time: datetime) -> bool: ...

    async def get_contacts(self, customer_ids: list[uuid.UUID]) -> dict[uuid.UUID, str]: ...

    async def get_notifications(self, notification_ids: list[uuid.UUID]) -> dict[uuid.UUID, Notification]: ...

    async def put_notification(self, notification: Notification, update_time: datetime) -> None: ...

    async def put_in_customer_log(self, notification: Notification) -> None: ...

    async def list_customer_notifications(self, customer_id: uuid.UUID, limit: int,
                                          after: tuple[datetime, uuid.UUID] | None) -> list[Notification]: ...


class Sender(Protocol):
    """Sends one email, one attempt: mailer.Mailer, or the fake of tests/unit."""

    async def send(self, email: Email) -> None: ...

# Derives notification ids from event ids; never change it, or redelivered events get new ids.
NOTIFICATION_ID_NAMESPACE = uuid.UUID("5b0c2f2e-8d4a-4a53-9a43-3f6f0c1f6e10")
VERIFICATION_SUBJECT = "Verify your email"
PASSWORD_RESET_SUBJECT = "Reset your password"
PASSWORD_CHANGED_SUBJECT = "Your password was changed"
EMAIL_CHANGED_SUBJECT = "Your email address was changed"
EMAIL_LENGTH_MAX = 320
NAME_LENGTH_MAX = 200
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

MAIL_BACKOFF = Backoff(tries=5, initial_s=0.2, max_s=5.0)
STORAGE_BACKOFF = Backoff(tries=5, initial_s=0.2, max_s=5.0)
# Longest one storage call can take: a Postgres pool wait plus statement timeout, or a
# Cassandra request timeout, whichever is longer.
STORAGE_CALL_TIMEOUT_S = max(10.0, cassandra.REQUEST_TIMEOUT_S)
# projection or contacts lookup, records' read (both side by side for a movement), record and
# list row (one call); the two emails of a transfer go side by side, so take no longer than one.
STORAGE_CALLS_PER_EVENT_MAX = 4
# Longest the handling of one event can take when every dependency hangs on every try; the
# consumer's poll interval is sized from it.
EVENT_WORST_CASE_S = (STORAGE_CALLS_PER_EVENT_MAX * STORAGE_BACKOFF.worst_case_s(STORAGE_CALL_TIMEOUT_S)
                      + MAIL_BACKOFF.worst_case_s(mailer.ATTEMPT_TIMEOUT_S))


class Kind(StrEnum):  # bank.notify.v1.Notification.Kind names
    EMAIL_VERIFICATION = "EMAIL_VERIFICATION"
    TRANSFER_SENT = "TRANSFER_SENT"
    TRANSFER_RECEIVED = "TRANSFER_RECEIVED"
    DEPOSIT = "DEPOSIT"
    WITHDRAWAL = "WITHDRAWAL"
    PASSWORD_RESET = "PASSWORD_RESET"
    PASSWORD_CHANGED = "PASSWORD_CHANGED"
    EMAIL_CHANGED = "EMAIL_CHANGED"
    HOLD_RELEASED = "HOLD_RELEASED"


class Channel(StrEnum):
    EMAIL = "EMAIL"


class Status(StrEnum):
    PENDING = "PENDING"
    SENT = "SENT"
    FAILED = "FAILED"


class MailUnavailable(StorageUnavailable):
    """The mail server still unreachable after the bounded tries: like storage being down, the
    consumer does not commit past the event and reads it again after a pause."""


class Outcome(StrEnum):
    SENT = "sent"
    FAILED = "failed"
    DUPLICATE = "duplicate"
    APPLIED = "applied"  # projection only
    NO_CONTACT = "no_contact"  # nobody to email: the customer is not in customer_contacts
    STALE = "stale"  # projection already reflects this or a later event


def notification_id(event_id: str, kind: Kind) -> uuid.UUID:
    return uuid.uuid5(NOTIFICATION_ID_NAMESPACE, f"{event_id}/{kind.value}")


def _now() -> datetime:
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)  # Cassandra keeps milliseconds


async def _storage(operation: Callable[[], Awaitable[T]], what: str) -> T:
    try:
        return await retry(operation, what=what, transient=TRANSIENT_ERRORS, backoff=STORAGE_BACKOFF)
    except UNAVAILABLE_ERRORS as exc:
        raise StorageUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc


def _customer_id(value: str) -> uuid.UUID:
    parsed = ids.parse_uuid(value)
    if parsed is None:
        raise BadEvent("customer_id is not a UUID")
    return parsed


def _email_address(value: str) -> str:
    if not value or len(value) > EMAIL_LENGTH_MAX or "@" not in value:
        raise BadEvent("email is not an address")
    return value


def _event_time(event: events_pb2.CustomerRegistered | events_pb2.EmailVerified | events_pb2.EmailChanged,
                meta: EventMeta) -> datetime:
    return event.create_time.ToDatetime(tzinfo=UTC) if event.HasField("create_time") else meta.fallback_time


# --- events -------------------------------------------------------------------------------

async def customer_registered(store: Notifications, sender: Sender, event: events_pb2.CustomerRegistered,
                              meta: EventMeta, *, redeliver_on_mail_outage: bool = False) -> Outcome:
    """Project the new customer, then email them their verification code, once."""
    customer_id = _customer_id(event.customer_id)
    email = _email_address(event.email)
    full_name = event.full_name[:NAME_LENGTH_MAX]
    if not event.verification_code:
        raise BadEvent("verification_code is empty")
    await _storage(lambda: store.upsert_registered_contact(customer_id, email, full_name, _event_time(event, meta)),
                   "customer_contacts upsert")
    greeting = f"Hello {full_name}," if full_name.strip() else "Hello,"
    text = (f"{greeting}\n\n"
            "Welcome to Simple Bank. Enter this code to verify your email address:\n\n"
            f"Verification code: {event.verification_code}\n\n"
            "If you did not register with Simple Bank, you can ignore this email.\n\n"
            "Simple Bank\n")
    return await _send_once(store, sender, meta, customer_id, Kind.EMAIL_VERIFICATION, email, VERIFICATION_SUBJECT,
                            text, redeliver_on_mail_outage)


async def email_verified(store: Notifications, event: events_pb2.EmailVerified, meta: EventMeta) -> Outcome:
    customer_id = _customer_id(event.customer_id)
    email = _email_address(event.email)
    applied = await _storage(lambda: store.mark_contact_verified(customer_id, email, _event_time(event, meta)),
                             "customer_contacts verify")
    return Outcome.APPLIED if applied else Outcome.STALE


# --- account recovery and profile (API.md, "v1 additions") --------------------------------
# Each of these events names its recipient itself (the address at that moment in svc_customer):
# a code goes to the address it proves, and the old address is told when it stops being used.

async def _send_once(store: Notifications, sender: Sender, meta: EventMeta, customer_id: uuid.UUID, kind: Kind,
                     recipient: str, subject: str, text: str, redeliver_on_mail_outage: bool) -> Outcome:
    notification = Notification(
        notification_id=notification_id(meta.event_id, kind), event_id=meta.event_id, customer_id=customer_id,
        kind=kind, channel=Channel.EMAIL, recipient=recipient, subject=subject, status=Status.PENDING, attempts=0,
        create_time=_now(),
    )
    found = await _records(store, [notification.notification_id])
    return await _deliver(store, sender, notification, found.get(notification.notification_id), text,
                          redeliver_on_mail_outage)


def _verification_text(full_name: str, code: str, why: str) -> str:
    greeting = f"Hello {full_name}," if full_name.strip() else "Hello,"
    return (f"{greeting}\n\n{why} Enter this code to verify your email address:\n\n"
            f"Verification code: {code}\n\n"
            "If you did not ask for this, you can ignore this email.\n\nSimple Bank\n")


def _code(value: str, what: str) -> str:
    if not value.isdigit():
        raise BadEvent(f"{what} is not a code")
    return value


async def verification_code_resent(store: Notifications, sender: Sender, event: events_pb2.VerificationCodeResent,
                                   meta: EventMeta, *, redeliver_on_mail_outage: bool = False) -> Outcome:
    text = _verification_text(event.full_name[:NAME_LENGTH_MAX], _code(event.verification_code, "verification_code"),
                              "Here is a new code for Simple Bank; the earlier ones no longer work.")
    return await _send_once(store, sender, meta, _customer_id(event.customer_id), Kind.EMAIL_VERIFICATION,
                            _email_address(event.email), VERIFICATION_SUBJECT, text, redeliver_on_mail_outage)


async def email_change_requested(store: Notifications, sender: Sender, event: events_pb2.EmailChangeRequested,
                                 meta: EventMeta, *, redeliver_on_mail_outage: bool = False) -> Outcome:
    text = _verification_text("", _code(event.verification_code, "verification_code"),
                              "A Simple Bank customer asked to use this address from now on.")
    return await _send_once(store, sender, meta, _customer_id(event.customer_id), Kind.EMAIL_VERIFICATION,
                            _email_address(event.new_email), VERIFICATION_SUBJECT, text, redeliver_on_mail_outage)


async def password_reset_requested(store: Notifications, sender: Sender, event: events_pb2.PasswordResetRequested,
                                   meta: EventMeta, *, redeliver_on_mail_outage: bool = False) -> Outcome:
    text = ("Hello,\n\nSomeone asked to reset the password of your Simple Bank login. To choose a new "
            "password, enter this code (valid 15 minutes, once):\n\n"
            f"Password reset code: {_code(event.reset_code, 'reset_code')}\n\n"
            "If it was not you, ignore this email: your password stays as it is.\n\nSimple Bank\n")
    return await _send_once(store, sender, meta, _customer_id(event.customer_id), Kind.PASSWORD_RESET,
                            _email_address(event.email), PASSWORD_RESET_SUBJECT, text, redeliver_on_mail_outage)


async def password_changed(store: Notifications, sender: Sender, event: events_pb2.PasswordChanged, meta: EventMeta, *,
                           redeliver_on_mail_outage: bool = False) -> Outcome:
    how = ("with a reset code; every session was logged out" if event.method == events_pb2.PasswordChanged.RESET
           else "while logged in; every other session was logged out")
    text = (f"Hello,\n\nThe password of your Simple Bank login was changed {how}.\n\n"
            "If it was not you, reset your password now and contact us.\n\nSimple Bank\n")
    return await _send_once(store, sender, meta, _customer_id(event.customer_id), Kind.PASSWORD_CHANGED,
                            _email_address(event.email), PASSWORD_CHANGED_SUBJECT, text, redeliver_on_mail_outage)


async def email_changed(store: Notifications, sender: Sender, event: events_pb2.EmailChanged, meta: EventMeta, *,
                        redeliver_on_mail_outage: bool = False) -> Outcome:
    """Every later email goes to the new address (the contacts projection); the old one is told."""
    customer_id = _customer_id(event.customer_id)
    old_email, new_email = _email_address(event.old_email), _email_address(event.new_email)
    # The new address was proven by the code it received: verified, as of the change.
    await _storage(lambda: store.mark_contact_verified(customer_id, new_email, _event_time(event, meta)),
                   "customer_contacts email change")
    text = ("Hello,\n\nThe email address of your Simple Bank customer record was changed from this address to "
            f"{new_email}. Emails from the bank go there from now on.\n\n"
            "If it was not you, contact us at once.\n\nSimple Bank\n")
    return await _send_once(store, sender, meta, customer_id, Kind.EMAIL_CHANGED, old_email, EMAIL_CHANGED_SUBJECT,
                            text, redeliver_on_mail_outage)


async def _records(store: Notifications, notification_ids: list[uuid.UUID]) -> dict[uuid.UUID, Notification]:
    """The records of an event's notifications (the reads of one loop turn are one request, store.py)."""
    return await _storage(lambda: store.get_notifications(notification_ids), "notification read")


async def _deliver(store: Notifications, sender: Sender, notification: Notification, found: Notification | None, text: str,
                   redeliver_on_mail_outage: bool = False) -> Outcome:
    """Send the notification once (found: its record, read just before, if there is one). When
    the mail server stays unreachable through the bounded tries, the notification is recorded
    FAILED; with redeliver_on_mail_outage (the consumers) the event is then not done either
    (MailUnavailable): it comes again after the consumer's pause and is sent then, so an outage
    of the mail server loses nothing."""
    stored = found or notification
    context = {"notification_id": str(stored.notification_id), "event_id": stored.event_id,
               "customer_id": str(stored.customer_id), "kind": stored.kind}
    if found is not None and found.status == Status.SENT:
        # Sent before. The customer's list may have missed the final write if we crashed
        # right after the record's; writing it again is idempotent and cheap.
        await _storage(lambda: store.put_in_customer_log(found), "notification log repair")
        log.info("duplicate event: notification already sent", extra=fields(**context))
        return Outcome.DUPLICATE
    if found is not None:  # FAILED (or PENDING, from before decision 0014): try again, counting on
        log.info("notification recorded before but not sent; sending again",
                 extra=fields(**context, status=found.status))

    email = Email(recipient=stored.recipient, subject=stored.subject, text=text,
                  message_id=f"{stored.notification_id}@{mailer.MESSAGE_ID_DOMAIN}")
    attempts = stored.attempts

    async def attempt() -> None:
        nonlocal attempts
        attempts += 1
        await sender.send(email)

    status = Status.SENT
    outage = False
    try:
        await retry(attempt, what="email send", transient=(TransientMailError,), backoff=MAIL_BACKOFF)
    except (TransientMailError, PermanentMailError) as exc:
        status = Status.FAILED
        outage = isinstance(exc, TransientMailError)
        log.error("email not delivered; recorded as FAILED",
                  extra=fields(**context, attempts=attempts, error=str(exc)))
    final = replace(stored, status=status, attempts=attempts)
    # The record and the list row together, one round trip. Once the record says SENT, a
    # redelivery sends nothing (and writes the list row again); a list row written without its
    # record (a failure half-way) is rewritten when the event comes again and is sent again,
    # as after a crash before the record.
    await _storage(lambda: store.put_notification(final, _now()), "notification record and log")
    if outage and redeliver_on_mail_outage:
        raise MailUnavailable(f"mail server unavailable after {attempts} attempts")
    if status is Status.SENT:
        log.info("email sent", extra=fields(**context, attempts=attempts))
        return Outcome.SENT
    return Outcome.FAILED


# --- money movements -----------------------------------------------------------------------

# Digits after the decimal point per ISO 4217 currency (API.md: the supported ones).
CURRENCY_DECIMALS = {"USD": 2, "EUR": 2, "GBP": 2, "JPY": 0}
DESCRIPTION_LENGTH_MAX = 200


def format_amount(amount: int, currency: str) -> str:
    """Minor units as people read them: 1234 USD -> "12.34 USD", 1234 JPY -> "1234 JPY"."""
    decimals = CURRENCY_DECIMALS.get(currency)
    if decimals is None:
        raise BadEvent(f"currency {currency!r} is not supported")
    sign, units = ("-" if amount < 0 else ""), abs(amount)
    if decimals == 0:
        return f"{sign}{units} {currency}"
    scale = 10 ** decimals
    return f"{sign}{units // scale}.{units % scale:0{decimals}d} {currency}"


def _transfer_footer(transfer_id: str) -> str:
    """The end of every email about a transfer (a movement or a hold): its reference, the signature."""
    return f"Reference: {transfer_id}\n\nSimple Bank\n"


@dataclass(frozen=True)
class _Party:
    customer_id: uuid.UUID
    kind: Kind
    subject: str
    text: str


def _parties(event: events_pb2.MoneyMoved) -> list[_Party]:
    """Who is told what about a movement: both sides of a transfer, the owner of a deposit or
    withdrawal (the cash side has no customer)."""
    if event.amount <= 0:
        raise BadEvent("amount is not positive")
    amount = format_amount(event.amount, event.currency)
    description = " ".join(event.description.split())[:DESCRIPTION_LENGTH_MAX]
    about = f"Description: {description}\n" if description else ""
    footer = _transfer_footer(event.transfer_id)
    MoneyMoved = events_pb2.MoneyMoved
    if event.kind == MoneyMoved.TRANSFER:
        sent_after = format_amount(event.from_balance_after, event.currency)
        received_after = format_amount(event.to_balance_after, event.currency)
        return [
            _Party(_customer_id(event.from_customer_id), Kind.TRANSFER_SENT, f"You sent {amount}",
                   f"You sent {amount} from account {event.from_account_id} to account {event.to_account_id}.\n"
                   f"{about}Balance after: {sent_after}\n{footer}"),
            _Party(_customer_id(event.to_customer_id), Kind.TRANSFER_RECEIVED, f"You received {amount}",
                   f"You received {amount} in account {event.to_account_id} from account {event.from_account_id}.\n"
                   f"{about}Balance after: {received_after}\n{footer}"),
        ]
    if event.kind == MoneyMoved.DEPOSIT:
        balance_after = format_amount(event.to_balance_after, event.currency)
        return [_Party(_customer_id(event.to_customer_id), Kind.DEPOSIT, f"Deposit of {amount}",
                       f"{amount} was deposited into account {event.to_account_id}.\n"
                       f"{about}Balance after: {balance_after}\n{footer}")]
    if event.kind == MoneyMoved.WITHDRAWAL:
        balance_after = format_amount(event.from_balance_after, event.currency)
        return [_Party(_customer_id(event.from_customer_id), Kind.WITHDRAWAL, f"Withdrawal of {amount}",
                       f"{amount} was withdrawn from account {event.from_account_id}.\n"
                       f"{about}Balance after: {balance_after}\n{footer}")]
    raise BadEvent(f"unknown movement kind {event.kind}")


# When one event yields several emails, the outcome reported is the most telling one.
_OUTCOME_RANK = [Outcome.FAILED, Outcome.SENT, Outcome.DUPLICATE, Outcome.NO_CONTACT]


async def money_moved(store: Notifications, sender: Sender, event: events_pb2.MoneyMoved, meta: EventMeta, *,
                      redeliver_on_mail_outage: bool = False) -> Outcome:
    """Email each party of a movement, once each, at the address of svc_notify's own contacts
    projection. A customer it has never heard of (no registration event) gets nothing."""
    return await _tell(store, sender, _parties(event), meta, redeliver_on_mail_outage)


async def _tell(store: Notifications, sender: Sender, parties: list[_Party], meta: EventMeta,
                redeliver_on_mail_outage: bool) -> Outcome:
    """Email each party once, at the address of the contacts projection (none known: nothing)."""
    ids = {party.kind: notification_id(meta.event_id, party.kind) for party in parties}
    # Side by side: the addresses (Postgres) and the records (Cassandra).
    contacts, found = await asyncio.gather(
        _storage(lambda: store.get_contacts([p.customer_id for p in parties]), "customer_contacts read"),
        _records(store, list(ids.values())))

    async def tell(party: _Party) -> Outcome:
        contact = contacts.get(party.customer_id)
        if contact is None:
            log.debug("no contact for the customer; no email", extra=fields(
                event_id=meta.event_id, customer_id=str(party.customer_id), kind=party.kind))
            return Outcome.NO_CONTACT
        notification = Notification(
            notification_id=ids[party.kind], event_id=meta.event_id,
            customer_id=party.customer_id, kind=party.kind, channel=Channel.EMAIL, recipient=contact,
            subject=party.subject, status=Status.PENDING, attempts=0, create_time=_now(),
        )
        return await _deliver(store, sender, notification, found.get(notification.notification_id), party.text,
                              redeliver_on_mail_outage)

    # Side by side, and each allowed to finish: cancelling a send half-way could deliver it
    # without recording it, and the redelivery would send it again.
    results = await asyncio.gather(*(tell(p) for p in parties), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    outcomes = [r for r in results if isinstance(r, Outcome)]
    return min(outcomes, key=_OUTCOME_RANK.index)


# --- holds (API.md, "Holds") ----------------------------------------------------------------
# Only a release is news to the payer: a placement is their own request, and a post brings a
# MoneyMoved, whose emails tell both sides (consumer.py routes neither HoldPlaced nor HoldPosted).

def _when(timestamp: Timestamp) -> str:
    return timestamp.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


async def hold_released(store: Notifications, sender: Sender, event: events_pb2.HoldVoided | events_pb2.HoldExpired,
                        meta: EventMeta, *, redeliver_on_mail_outage: bool = False) -> Outcome:
    """Tell the payer, once, that the money a hold reserved on their account is theirs again:
    the hold was voided (by the payee or a teller) or it lapsed."""
    if event.held_amount <= 0:
        raise BadEvent("held_amount is not positive")
    amount = format_amount(event.held_amount, event.currency)
    if isinstance(event, events_pb2.HoldVoided):
        # The event does not say who voided: the payee, or a teller on the bank's side.
        why = "was voided by the payee (or by the bank)"
    elif event.HasField("expire_time"):
        why = f"expired at {_when(event.expire_time)} without being taken"
    else:
        why = "expired without being taken"
    text = (f"The hold of {amount} on account {event.from_account_id} for account {event.to_account_id} {why}.\n"
            "All of it is available to you again; no money moved.\n"
            f"{_transfer_footer(event.transfer_id)}")
    payer = _Party(_customer_id(event.from_customer_id), Kind.HOLD_RELEASED, f"A hold of {amount} was released", text)
    return await _tell(store, sender, [payer], meta, redeliver_on_mail_outage)


# --- ListNotifications --------------------------------------------------------------------

@dataclass(frozen=True)
class Page:
    notifications: list[Notification]
    next_page_token: str


def _page_key(token: str) -> tuple[datetime, uuid.UUID] | None:
    key = pagination.decode_token(token, 2)
    if key is None:
        return None
    create_time_ms, raw_id = key
    if not isinstance(create_time_ms, int) or isinstance(create_time_ms, bool) or not isinstance(raw_id, str):
        raise pagination.invalid_token()
    parsed_id = ids.parse_uuid(raw_id)
    try:
        create_time = EPOCH + timedelta(milliseconds=create_time_ms)
    except OverflowError as exc:
        raise pagination.invalid_token() from exc
    if parsed_id is None:
        raise pagination.invalid_token()
    return create_time, parsed_id


async def list_notifications(store: Notifications, caller: auth.Caller, page_size: int, page_token: str) -> Page:
    """The caller's own notifications, newest first. A teller owns none: an empty list (not an
    error), the same answer as for a customer who was never notified."""
    size = pagination.page_size(page_size)
    after = _page_key(page_token)
    customer_id = ids.parse_uuid(caller.customer_id or "")
    if customer_id is None:
        return Page([], "")
    try:
        # One more than asked: tells whether a next page exists, so the last page has no token.
        rows = await store.list_customer_notifications(customer_id, size + 1, after)
    except UNAVAILABLE_ERRORS as exc:
        log.warning("notification log unavailable", extra=fields(error=f"{type(exc).__name__}: {exc}"))
        raise refused("NOTIFICATIONS_UNAVAILABLE",
                      "notifications cannot be read now; retry") from exc
    page = rows[:size]
    token = ""
    if len(rows) > size:
        last = page[-1]
        # Integer milliseconds, exactly: a float could round past a row and skip it.
        token = pagination.encode_token([(last.create_time - EPOCH) // timedelta(milliseconds=1), str(last.notification_id)])
    return Page(page, token)

"""svc_notify's Kafka consumers: customer events (group "svc_notify") feed the contacts
projection and the emails about the customer's own record (verification codes, password
resets and changes, email changes); transfer events (group "svc_notify.transfer") become the
emails after each movement and each released hold. Two groups, so a burst of transfers never delays a verification
code. The consuming itself (commits, batches, pauses, dead letters) is common/consumer.py."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from bank.events.v1 import events_pb2
from google.protobuf.message import Message

from common.config import Settings
from common.consumer import EventConsumer, EventMeta, Route, member_name
from common.events import CUSTOMER_TOPIC, TRANSFER_TOPIC
from svc_notify import service
from svc_notify.mailer import Mailer
from svc_notify.store import Store

GROUP_ID = "svc_notify"
TRANSFER_GROUP_ID = "svc_notify.transfer"


# A use case that emails someone: (store, sender, event, meta, *, redeliver_on_mail_outage).
_MailingUseCase = Callable[..., Awaitable[str]]

# Group GROUP_ID, topic CUSTOMER_TOPIC: the emails about the customer's own record. EmailVerified
# emails nobody: it only updates the contacts projection (its route is added in routes()).
_CUSTOMER_MAILING: dict[type[Message], _MailingUseCase] = {
    events_pb2.CustomerRegistered: service.customer_registered,
    events_pb2.VerificationCodeResent: service.verification_code_resent,
    events_pb2.PasswordResetRequested: service.password_reset_requested,
    events_pb2.PasswordChanged: service.password_changed,
    events_pb2.EmailChangeRequested: service.email_change_requested,
    events_pb2.EmailChanged: service.email_changed,
}
# Group TRANSFER_GROUP_ID, topic TRANSFER_TOPIC: the emails after each movement and each released
# hold. HoldPlaced and HoldPosted have no route: committed past, nothing to tell (a post's money
# comes as a MoneyMoved).
_TRANSFER_MAILING: dict[type[Message], _MailingUseCase] = {
    events_pb2.MoneyMoved: service.money_moved,
    events_pb2.HoldVoided: service.hold_released,
    events_pb2.HoldExpired: service.hold_released,
}


def routes(store: service.Notifications, sender: service.Sender) -> dict[str, dict[str, Route]]:
    """Each consumer group's routes, by event type name (store and sender: the real ones, or fakes)."""
    def mailing(event_type: type[Message], use_case: _MailingUseCase) -> Route:
        async def handle(message: Message, meta: EventMeta) -> str:
            assert isinstance(message, event_type)
            # A mail outage leaves the event undone: it comes again after the consumer's pause.
            return await use_case(store, sender, message, meta, redeliver_on_mail_outage=True)
        return Route(event_type, handle)

    def mailing_routes(use_cases: dict[type[Message], _MailingUseCase]) -> dict[str, Route]:
        return {event_type.DESCRIPTOR.full_name: mailing(event_type, use_case)
                for event_type, use_case in use_cases.items()}

    async def email_verified(message: Message, meta: EventMeta) -> str:
        assert isinstance(message, events_pb2.EmailVerified)
        return await service.email_verified(store, message, meta)

    customer_routes = mailing_routes(_CUSTOMER_MAILING)
    customer_routes[events_pb2.EmailVerified.DESCRIPTOR.full_name] = Route(events_pb2.EmailVerified, email_verified)
    return {GROUP_ID: customer_routes, TRANSFER_GROUP_ID: mailing_routes(_TRANSFER_MAILING)}


def new_consumers(settings: Settings, store: Store, sender: Mailer) -> list[EventConsumer]:
    by_group = routes(store, sender)
    return [
        EventConsumer(settings, group_id=GROUP_ID, topics=[CUSTOMER_TOPIC], routes=by_group[GROUP_ID],
                      event_worst_case_s=service.EVENT_WORST_CASE_S, static_member=member_name(settings, GROUP_ID)),
        # Each transfer is its own key (one event per transfer id), so there is no order to keep:
        # the records of a batch are worked on together (at most BATCH_MAX_RECORDS emails at once).
        EventConsumer(settings, group_id=TRANSFER_GROUP_ID, topics=[TRANSFER_TOPIC], routes=by_group[TRANSFER_GROUP_ID],
                      event_worst_case_s=service.EVENT_WORST_CASE_S, ordered=False, batch_max_records=200,
                      static_member=member_name(settings, TRANSFER_GROUP_ID)),
    ]

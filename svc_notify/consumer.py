"""svc_notify's Kafka consumers: customer events (group "svc_notify") feed the contacts
projection and the emails about the customer's own record (verification codes, password
resets and changes, email changes); transfer events (group "svc_notify.transfer") become the
emails after each movement. Two groups, so a burst of transfers never delays a verification
code. The consuming itself (commits, batches, pauses, dead letters) is common/consumer.py."""

from __future__ import annotations

from bank.events.v1 import events_pb2
from google.protobuf.message import Message

from common.config import Settings
from common.consumer import EventConsumer, EventMeta, Route
from common.events import CUSTOMER_TOPIC, TRANSFER_TOPIC
from svc_notify import service
from svc_notify.mailer import Mailer
from svc_notify.store import Store

GROUP_ID = "svc_notify"
TRANSFER_GROUP_ID = "svc_notify.transfer"


def new_consumers(settings: Settings, store: Store, sender: Mailer) -> list[EventConsumer]:
    async def customer_registered(message: Message, meta: EventMeta) -> str:
        assert isinstance(message, events_pb2.CustomerRegistered)
        return await service.customer_registered(store, sender, message, meta, redeliver_on_mail_outage=True)

    async def email_verified(message: Message, meta: EventMeta) -> str:
        assert isinstance(message, events_pb2.EmailVerified)
        return await service.email_verified(store, message, meta)

    async def verification_code_resent(message: Message, meta: EventMeta) -> str:
        assert isinstance(message, events_pb2.VerificationCodeResent)
        return await service.verification_code_resent(store, sender, message, meta, redeliver_on_mail_outage=True)

    async def password_reset_requested(message: Message, meta: EventMeta) -> str:
        assert isinstance(message, events_pb2.PasswordResetRequested)
        return await service.password_reset_requested(store, sender, message, meta, redeliver_on_mail_outage=True)

    async def password_changed(message: Message, meta: EventMeta) -> str:
        assert isinstance(message, events_pb2.PasswordChanged)
        return await service.password_changed(store, sender, message, meta, redeliver_on_mail_outage=True)

    async def email_change_requested(message: Message, meta: EventMeta) -> str:
        assert isinstance(message, events_pb2.EmailChangeRequested)
        return await service.email_change_requested(store, sender, message, meta, redeliver_on_mail_outage=True)

    async def email_changed(message: Message, meta: EventMeta) -> str:
        assert isinstance(message, events_pb2.EmailChanged)
        return await service.email_changed(store, sender, message, meta, redeliver_on_mail_outage=True)

    async def money_moved(message: Message, meta: EventMeta) -> str:
        assert isinstance(message, events_pb2.MoneyMoved)
        return await service.money_moved(store, sender, message, meta, redeliver_on_mail_outage=True)

    customer_routes = {
        events_pb2.CustomerRegistered.DESCRIPTOR.full_name: Route(events_pb2.CustomerRegistered, customer_registered),
        events_pb2.EmailVerified.DESCRIPTOR.full_name: Route(events_pb2.EmailVerified, email_verified),
        events_pb2.VerificationCodeResent.DESCRIPTOR.full_name: Route(events_pb2.VerificationCodeResent,
                                                                      verification_code_resent),
        events_pb2.PasswordResetRequested.DESCRIPTOR.full_name: Route(events_pb2.PasswordResetRequested,
                                                                      password_reset_requested),
        events_pb2.PasswordChanged.DESCRIPTOR.full_name: Route(events_pb2.PasswordChanged, password_changed),
        events_pb2.EmailChangeRequested.DESCRIPTOR.full_name: Route(events_pb2.EmailChangeRequested,
                                                                    email_change_requested),
        events_pb2.EmailChanged.DESCRIPTOR.full_name: Route(events_pb2.EmailChanged, email_changed),
    }
    transfer_routes = {events_pb2.MoneyMoved.DESCRIPTOR.full_name: Route(events_pb2.MoneyMoved, money_moved)}
    return [
        EventConsumer(settings, group_id=GROUP_ID, topics=[CUSTOMER_TOPIC], routes=customer_routes,
                      event_worst_case_s=service.EVENT_WORST_CASE_S),
        # Each transfer is its own key (one event per transfer id), so there is no order to keep:
        # the records of a batch are worked on together (at most BATCH_MAX_RECORDS emails at once).
        EventConsumer(settings, group_id=TRANSFER_GROUP_ID, topics=[TRANSFER_TOPIC], routes=transfer_routes,
                      event_worst_case_s=service.EVENT_WORST_CASE_S, ordered=False, batch_max_records=200),
    ]

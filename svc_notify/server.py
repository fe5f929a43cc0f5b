"""svc_notify's gRPC entrypoint: NotificationService (public, routed by Envoy), plus the workers
that run beside it: the notification store (Cassandra) and the event consumer."""

from __future__ import annotations

from pathlib import Path

import grpc
from bank.notify.v1 import notify_pb2, notify_pb2_grpc
from google.protobuf.timestamp_pb2 import Timestamp

from common import auth, server
from common.grpcutil import service_name
from svc_notify import service
from svc_notify.consumer import new_consumers
from svc_notify.mailer import Mailer
from svc_notify.store import Notification, Store


def _to_proto(n: Notification) -> notify_pb2.Notification:
    create_time = Timestamp()
    create_time.FromDatetime(n.create_time)
    return notify_pb2.Notification(
        notification_id=str(n.notification_id),
        kind=notify_pb2.Notification.Kind.Value(n.kind),
        channel=notify_pb2.Notification.Channel.Value(n.channel),
        recipient=n.recipient,
        subject=n.subject,
        status=notify_pb2.Notification.Status.Value(n.status),
        create_time=create_time,
    )


class NotificationService(notify_pb2_grpc.NotificationServiceServicer):
    def __init__(self, store: Store) -> None:
        self._store = store

    async def ListNotifications(
        self, request: notify_pb2.ListNotificationsRequest, context: grpc.aio.ServicerContext
    ) -> notify_pb2.ListNotificationsResponse:
        page = await service.list_notifications(self._store, auth.current(), request.page_size, request.page_token)
        return notify_pb2.ListNotificationsResponse(
            notifications=[_to_proto(n) for n in page.notifications], next_page_token=page.next_page_token
        )


def register(grpc_server: grpc.aio.Server, resources: server.Resources) -> list[str]:
    store = Store(resources.settings, resources.pool)
    sender = Mailer(resources.settings)
    # Started in this order, stopped in reverse: the consumers stop before the mailer's kept
    # connections and the store close.
    resources.workers.extend([store, sender])
    resources.workers.extend(new_consumers(resources.settings, store, sender))
    notify_pb2_grpc.add_NotificationServiceServicer_to_server(NotificationService(store), grpc_server)
    return [service_name(notify_pb2, "NotificationService")]


def main() -> None:
    server.run(server.ServiceSpec("notify", register, Path(__file__).parent / "migrations"))

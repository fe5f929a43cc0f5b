"""svc_notify's gRPC entrypoint: NotificationService (public, routed by Envoy).

Not built yet: every RPC answers UNIMPLEMENTED (see README's status table).
"""

from __future__ import annotations

from pathlib import Path

import grpc
from bank.notify.v1 import notify_pb2, notify_pb2_grpc

from common import server
from common.grpcutil import service_name


class NotificationService(notify_pb2_grpc.NotificationServiceServicer):
    pass


def register(grpc_server: grpc.aio.Server, resources: server.Resources) -> list[str]:
    notify_pb2_grpc.add_NotificationServiceServicer_to_server(NotificationService(), grpc_server)
    return [service_name(notify_pb2, "NotificationService")]


def main() -> None:
    server.run(server.ServiceSpec("notify", register, Path(__file__).parent / "migrations"))

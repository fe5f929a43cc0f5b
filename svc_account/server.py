"""svc_account's gRPC entrypoint: AccountService (public, routed by Envoy).

Not built yet: every RPC answers UNIMPLEMENTED (see README's status table).
"""

from __future__ import annotations

from pathlib import Path

import grpc
from bank.account.v1 import account_pb2, account_pb2_grpc

from common import server
from common.grpcutil import service_name


class AccountService(account_pb2_grpc.AccountServiceServicer):
    pass


def register(grpc_server: grpc.aio.Server, resources: server.Resources) -> list[str]:
    account_pb2_grpc.add_AccountServiceServicer_to_server(AccountService(), grpc_server)
    return [service_name(account_pb2, "AccountService")]


def main() -> None:
    server.run(server.ServiceSpec("account", register, Path(__file__).parent / "migrations"))

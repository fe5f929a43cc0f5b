"""svc_transfer's gRPC entrypoint: TransferService (public, routed by Envoy) and LedgerService
(internal: svc_account opens ledger accounts and changes their status through it).

Not built yet: every RPC answers UNIMPLEMENTED (see README's status table).
"""

from __future__ import annotations

from pathlib import Path

import grpc
from bank.transfer.v1 import ledger_pb2, ledger_pb2_grpc, transfer_pb2, transfer_pb2_grpc

from common import server
from common.grpcutil import service_name


class TransferService(transfer_pb2_grpc.TransferServiceServicer):
    pass


class LedgerService(ledger_pb2_grpc.LedgerServiceServicer):
    pass


def register(grpc_server: grpc.aio.Server, resources: server.Resources) -> list[str]:
    transfer_pb2_grpc.add_TransferServiceServicer_to_server(TransferService(), grpc_server)
    ledger_pb2_grpc.add_LedgerServiceServicer_to_server(LedgerService(), grpc_server)
    return [service_name(transfer_pb2, "TransferService"), service_name(ledger_pb2, "LedgerService")]


def main() -> None:
    server.run(server.ServiceSpec("transfer", register, Path(__file__).parent / "migrations"))

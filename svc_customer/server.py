"""svc_customer's gRPC entrypoint: CustomerService and AuthService (public, routed by Envoy) and
CustomerInternalService (internal, for other services only).

Not built yet: every RPC answers UNIMPLEMENTED (the generated base classes raise it; the
interceptor maps it to a google.rpc.Status with reason NOT_IMPLEMENTED). See README's status table.
"""

from __future__ import annotations

from pathlib import Path

import grpc
from bank.auth.v1 import auth_pb2, auth_pb2_grpc
from bank.customer.v1 import customer_internal_pb2, customer_internal_pb2_grpc, customer_pb2, customer_pb2_grpc

from common import server
from common.grpcutil import service_name


class CustomerService(customer_pb2_grpc.CustomerServiceServicer):
    pass


class AuthService(auth_pb2_grpc.AuthServiceServicer):
    pass


class CustomerInternalService(customer_internal_pb2_grpc.CustomerInternalServiceServicer):
    pass


def register(grpc_server: grpc.aio.Server, resources: server.Resources) -> list[str]:
    customer_pb2_grpc.add_CustomerServiceServicer_to_server(CustomerService(), grpc_server)
    auth_pb2_grpc.add_AuthServiceServicer_to_server(AuthService(), grpc_server)
    customer_internal_pb2_grpc.add_CustomerInternalServiceServicer_to_server(CustomerInternalService(), grpc_server)
    return [
        service_name(customer_pb2, "CustomerService"),
        service_name(auth_pb2, "AuthService"),
        service_name(customer_internal_pb2, "CustomerInternalService"),
    ]


def main() -> None:
    server.run(server.ServiceSpec("customer", register, Path(__file__).parent / "migrations"))

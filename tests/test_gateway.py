"""Smoke tests through Envoy, the only public door: REST/JSON and native gRPC reach every public
service; internal services, reflection and unknown routes do not; the request id travels to the
service's log.

Each call is one our service refuses (no token, a wrong password, a malformed email): that
answer carries our ErrorInfo (domain "simplebank"), which only our interceptor produces, so it
proves the whole path (route, transcoding, service, error mapping, status rendering) whatever
is built behind it.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import grpc
import pytest
from bank.account.v1 import account_pb2, account_pb2_grpc
from bank.auth.v1 import auth_pb2, auth_pb2_grpc
from bank.customer.v1 import customer_pb2, customer_pb2_grpc
from bank.notify.v1 import notify_pb2, notify_pb2_grpc
from bank.transfer.v1 import ledger_pb2, ledger_pb2_grpc, transfer_pb2, transfer_pb2_grpc

from common.config import Settings
from common.errors import error_info, status_of
from devstack.stack import Stack
from tests.support import ERROR_INFO_TYPE, rest

# One REST call per public service (and both services of svc_customer): status and reason expected.
REST_CASES = [
    ("POST", "/v1/customers", {"email": "not-an-email", "full_name": "Smoke Test"}, 400, "INVALID_ARGUMENT"),
    # A fresh username each run: failed logins of one username are rate limited (10 per 15 min).
    ("POST", "/v1/sessions", {"username": f"nobody-{uuid.uuid4().hex[:10]}", "password": "not-a-real-password"}, 401,
     "BAD_CREDENTIALS"),
    ("GET", "/v1/accounts?page_size=10", None, 401, "UNAUTHENTICATED"),
    ("POST", "/v1/transfers", {"request_id": "r1", "from_account_id": "a", "to_account_id": "b",
                               "amount": "100", "currency": "USD"}, 401, "UNAUTHENTICATED"),
    ("GET", "/v1/notifications", None, 401, "UNAUTHENTICATED"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "reason"), REST_CASES, ids=[c[1] for c in REST_CASES])
def test_rest_reaches_every_public_service(stack: Stack, settings: Settings, method: str, path: str,
                                           body: Any, status: int, reason: str) -> None:
    response = rest(settings, method, path, body)
    assert response.status == status, response.body
    assert response.headers.get("content-type", "").startswith("application/json")
    [info] = [d for d in response.body["details"] if d["@type"] == ERROR_INFO_TYPE]
    assert info["reason"] == reason and info["domain"] == "simplebank"


async def _call_each_public_service(channel: grpc.aio.Channel) -> dict[str, grpc.aio.AioRpcError]:
    calls = {
        "CustomerService": customer_pb2_grpc.CustomerServiceStub(channel).GetCustomer(
            customer_pb2.GetCustomerRequest(customer_id="c1"), timeout=5),
        "AuthService": auth_pb2_grpc.AuthServiceStub(channel).Logout(
            auth_pb2.LogoutRequest(session_id="s1"), timeout=5),
        "AccountService": account_pb2_grpc.AccountServiceStub(channel).GetAccount(
            account_pb2.GetAccountRequest(account_id="a1"), timeout=5),
        "TransferService": transfer_pb2_grpc.TransferServiceStub(channel).GetTransfer(
            transfer_pb2.GetTransferRequest(transfer_id="t1"), timeout=5),
        "NotificationService": notify_pb2_grpc.NotificationServiceStub(channel).ListNotifications(
            notify_pb2.ListNotificationsRequest(), timeout=5),
    }
    errors = {}
    for name, call in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        errors[name] = caught.value
    return errors


async def test_grpc_through_envoy_reaches_every_public_service(stack: Stack, settings: Settings) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.envoy_port}") as channel:
        errors = await _call_each_public_service(channel)
    for name, error in errors.items():
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, name
        status = status_of(error)
        assert status is not None, f"{name}: no google.rpc.Status details came back through Envoy"
        info = error_info(status)
        assert info is not None and info.reason == "UNAUTHENTICATED" and info.domain == "simplebank", name


async def test_internal_services_are_not_routed_by_envoy(stack: Stack, settings: Settings) -> None:
    request = ledger_pb2.OpenLedgerAccountRequest(account_id="a", customer_id="c", currency="USD")
    # Directly on svc_transfer's port the internal service exists, and refuses a caller without
    # the service token...
    async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.transfer_grpc_port}") as direct:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ledger_pb2_grpc.LedgerServiceStub(direct).OpenLedgerAccount(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    direct_status = status_of(caught.value)
    assert direct_status is not None
    direct_info = error_info(direct_status)
    assert direct_info is not None and direct_info.reason == "SERVICE_ONLY"
    # ...through Envoy there is no route: Envoy answers by itself, and no service is reached.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.envoy_port}") as gateway:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ledger_pb2_grpc.LedgerServiceStub(gateway).OpenLedgerAccount(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert status_of(caught.value) is None
    # Neither reflection nor health is public.
    assert rest(settings, "POST", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", {}).status == 404
    assert rest(settings, "POST", "/grpc.health.v1.Health/Check", {}).status == 404


def test_unknown_rest_route_is_404(stack: Stack, settings: Settings) -> None:
    assert rest(settings, "GET", "/v1/no-such-thing").status == 404


def test_unknown_query_parameter_is_rejected(stack: Stack, settings: Settings) -> None:
    assert rest(settings, "GET", "/v1/accounts?no_such_parameter=1").status == 400


def test_request_id_travels_from_envoy_into_the_service_log(stack: Stack, settings: Settings) -> None:
    request_id = f"smoke-{uuid.uuid4().hex}"
    rest(settings, "GET", "/v1/notifications", headers={"X-Request-Id": request_id})
    log_path = stack.paths.log("svc_notify")
    deadline = time.monotonic() + 5
    lines: list[dict[str, Any]] = []
    while not lines and time.monotonic() < deadline:
        lines = [json.loads(line) for line in log_path.read_text().splitlines()
                 if request_id in line and line.startswith("{")]
        time.sleep(0.1)
    assert lines, f"no log line with {request_id} in {log_path}"
    assert lines[0]["request_id"] == request_id
    assert lines[0]["service"] == "svc_notify"
    assert lines[0]["method"] == "/bank.notify.v1.NotificationService/ListNotifications"
    assert lines[0]["reason"] == "UNAUTHENTICATED"

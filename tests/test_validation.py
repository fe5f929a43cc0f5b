"""Bad input, end to end: the rules the protos declare (buf.validate, enforced by the one server
interceptor in common/interceptors.py) and Envoy's limits on bodies and headers.

- Through Envoy by REST and directly over gRPC on the services' own ports, malformed requests to
  every public service answer 400 / INVALID_ARGUMENT with a google.rpc.BadRequest naming each bad
  field, never a 500, and with API.md's reason where it names one (INVALID_AMOUNT,
  UNSUPPORTED_CURRENCY, WEAK_PASSWORD, INVALID_CODE, INVALID_PAGE_SIZE, INVALID_PAGE_TOKEN).
- A caller without a valid token learns nothing about its input: 401 first.
- Every public request message declares rules, except the two whose fields are credentials.
- Envoy refuses an oversize body (413) and oversize or too many headers (431) itself, and the
  services answer normally right after.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from bank.account.v1 import account_pb2, account_pb2_grpc
from bank.auth.v1 import auth_pb2, auth_pb2_grpc
from bank.customer.v1 import customer_pb2, customer_pb2_grpc
from bank.notify.v1 import notify_pb2, notify_pb2_grpc
from bank.transfer.v1 import transfer_pb2, transfer_pb2_grpc
from buf.validate import validate_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2

from common.config import Settings
from common.errors import error_info, status_of
from common.interceptors import check_rules
from devstack.stack import Stack
from tests.gateway_support import BODY_LIMIT_BYTES, HEADER_COUNT_LIMIT, HEADERS_LIMIT_BYTES, raw_request
from tests.support import Response, rest
from tests.tokens import TestTokens

BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
TOO_LONG_ID = "x" * 65


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def violated_fields(body: Any) -> set[str]:
    """The fields a REST error's BadRequest names."""
    return {violation["field"] for detail in body.get("details", []) if detail.get("@type") == BAD_REQUEST_TYPE
            for violation in detail["field_violations"]}


def assert_invalid(response: Response, reason: str, fields: set[str]) -> None:
    assert response.status == 400, response.body
    assert response.body["code"] == 3, response.body  # INVALID_ARGUMENT
    assert response.reason == reason, response.body
    assert violated_fields(response.body) == fields, response.body


# --- REST through Envoy ---------------------------------------------------------------------

def test_customer_and_auth_inputs_are_checked_by_rest(stack: Stack, settings: Settings) -> None:
    register = rest(settings, "POST", "/v1/customers", {"email": "not-an-email", "full_name": "", "phone_number": "12"})
    assert_invalid(register, "INVALID_ARGUMENT", {"email", "full_name", "phone_number"})
    assert_invalid(rest(settings, "POST", "/v1/customers", {"email": f"{'a' * 250}@example.com", "full_name": "A"}),
                   "INVALID_ARGUMENT", {"email"})
    verify = rest(settings, "POST", f"/v1/customers/{uuid.uuid4()}:verifyEmail", {"code": "12ab"})
    assert_invalid(verify, "INVALID_CODE", {"code"})
    credential = {"enrollment_token": "unused", "username": "a!", "password": "correct-horse-battery-staple"}
    assert_invalid(rest(settings, "POST", "/v1/credentials", credential), "INVALID_ARGUMENT", {"username"})
    assert_invalid(rest(settings, "POST", "/v1/credentials", {**credential, "username": "ada-lovelace", "password": "short"}),
                   "WEAK_PASSWORD", {"password"})


def test_account_inputs_are_checked_by_rest(settings: Settings, tokens: TestTokens) -> None:
    customer = tokens.customer(str(uuid.uuid4()))
    assert_invalid(rest(settings, "POST", "/v1/accounts", {"currency": "DOLLARS"}, token=customer),
                   "UNSUPPORTED_CURRENCY", {"currency"})
    assert_invalid(rest(settings, "GET", "/v1/accounts?page_size=-1", token=customer), "INVALID_PAGE_SIZE", {"page_size"})
    assert_invalid(rest(settings, "GET", f"/v1/accounts/{TOO_LONG_ID}", token=customer), "INVALID_ARGUMENT",
                   {"account_id"})
    assert_invalid(rest(settings, "GET", f"/v1/accounts/{uuid.uuid4()}/activity?page_token={'t' * 513}", token=customer),
                   "INVALID_PAGE_TOKEN", {"page_token"})
    freeze = rest(settings, "POST", f"/v1/accounts/{uuid.uuid4()}:freeze", {"reason": "r" * 201}, token=tokens.teller())
    assert_invalid(freeze, "INVALID_ARGUMENT", {"reason"})


def test_transfer_inputs_are_checked_by_rest(settings: Settings, tokens: TestTokens) -> None:
    customer = tokens.customer(str(uuid.uuid4()))
    everything_wrong = {"request_id": TOO_LONG_ID, "from_account_id": "", "to_account_id": TOO_LONG_ID,
                        "amount": "0", "currency": "usd", "description": "d" * 201}
    # The first violation's reason, in field order: request_id comes before amount.
    assert_invalid(rest(settings, "POST", "/v1/transfers", everything_wrong, token=customer), "INVALID_ARGUMENT",
                   {"request_id", "from_account_id", "to_account_id", "amount", "currency", "description"})
    valid = {"request_id": f"r-{uuid.uuid4().hex}", "from_account_id": str(uuid.uuid4()),
             "to_account_id": str(uuid.uuid4()), "amount": "100", "currency": "USD"}
    assert_invalid(rest(settings, "POST", "/v1/transfers", {**valid, "amount": "-5"}, token=customer),
                   "INVALID_AMOUNT", {"amount"})
    deposit = {"request_id": "", "account_id": str(uuid.uuid4()), "amount": "0", "currency": "USD"}
    assert_invalid(rest(settings, "POST", "/v1/deposits", deposit, token=tokens.teller()), "INVALID_ARGUMENT",
                   {"request_id", "amount"})
    assert_invalid(rest(settings, "GET", f"/v1/transfers/{TOO_LONG_ID}", token=customer), "INVALID_ARGUMENT",
                   {"transfer_id"})
    # Well-formed but unknown: the services still decide (404, API.md), the rules do not.
    unknown = rest(settings, "POST", "/v1/transfers", valid, token=customer)
    assert (unknown.status, unknown.reason) == (404, "ACCOUNT_NOT_FOUND"), unknown.body


def test_an_amount_that_is_no_int64_is_invalid_amount_by_rest(settings: Settings, tokens: TestTokens) -> None:
    """API.md: amount > 0 and within int64, else 400 INVALID_AMOUNT. Such a value never reaches a
    service over REST (the transcoder cannot make an int64 of it); Envoy answers for it."""
    customer, teller = tokens.customer(str(uuid.uuid4())), tokens.teller()
    transfer = {"request_id": f"r-{uuid.uuid4().hex}", "from_account_id": str(uuid.uuid4()),
                "to_account_id": str(uuid.uuid4()), "currency": "USD"}
    deposit = {"request_id": f"r-{uuid.uuid4().hex}", "account_id": str(uuid.uuid4()), "currency": "USD"}
    for amount in ["9223372036854775808", "-9223372036854775809", "1" + "0" * 30, 1.5, "abc", True]:
        for path, body, token in [("/v1/transfers", transfer, customer), ("/v1/deposits", deposit, teller),
                                  ("/v1/withdrawals", deposit, teller)]:
            assert_invalid(rest(settings, "POST", path, {**body, "amount": amount}, token=token), "INVALID_AMOUNT",
                           {"amount"})
    # The largest int64 is an amount: the service decides (the accounts do not exist).
    largest = rest(settings, "POST", "/v1/transfers", {**transfer, "amount": "9223372036854775807"}, token=customer)
    assert (largest.status, largest.reason) == (404, "ACCOUNT_NOT_FOUND"), largest.body
    # Other bodies the transcoder refuses keep its own answer.
    other = rest(settings, "GET", "/v1/notifications?page_size=abc", token=customer)
    assert other.status == 400 and other.body["code"] == 3 and other.reason is None, other.body


def test_notification_inputs_are_checked_by_rest(settings: Settings, tokens: TestTokens) -> None:
    customer = tokens.customer(str(uuid.uuid4()))
    assert_invalid(rest(settings, "GET", "/v1/notifications?page_size=-3", token=customer), "INVALID_PAGE_SIZE",
                   {"page_size"})
    assert_invalid(rest(settings, "GET", f"/v1/notifications?page_token={'t' * 600}", token=customer),
                   "INVALID_PAGE_TOKEN", {"page_token"})


def test_a_caller_without_a_token_learns_nothing_about_its_input(settings: Settings) -> None:
    response = rest(settings, "POST", "/v1/transfers", {"request_id": "", "amount": "0"})
    assert (response.status, response.reason) == (401, "UNAUTHENTICATED"), response.body
    assert violated_fields(response.body) == set()


@pytest.mark.parametrize("body", [
    {"request_id": "r", "from_account_id": "a", "to_account_id": "b", "amount": "9223372036854775808", "currency": "USD"},
    {"request_id": "r", "from_account_id": "a", "to_account_id": "b", "amount": "ten", "currency": "USD"},
    {"request_id": ["r"], "amount": {"nested": True}},
    {"request_id": "\u0000\ud7ff\U0001f4b8" * 30, "from_account_id": "\n", "to_account_id": "' OR 1=1 --", "amount": 1,
     "currency": "€€€", "description": "\u202e" * 300},
    {"unknown_field": 1},
    "not an object",
], ids=["int64-overflow", "amount-not-a-number", "wrong-json-types", "odd-unicode", "unknown-field", "not-an-object"])
def test_garbage_is_a_client_error_never_a_server_error(settings: Settings, tokens: TestTokens, body: Any) -> None:
    response = rest(settings, "POST", "/v1/transfers", body, token=tokens.customer(str(uuid.uuid4())))
    assert response.status == 400, response.body


# --- gRPC straight to each service's port ---------------------------------------------------

@pytest.fixture(scope="module")
async def channels(stack: Stack, settings: Settings) -> AsyncIterator[dict[str, grpc.aio.Channel]]:
    services = ("customer", "account", "transfer", "notify")
    opened = {name: grpc.aio.insecure_channel(f"127.0.0.1:{getattr(settings, f'{name}_grpc_port')}") for name in services}
    try:
        yield opened
    finally:
        for channel in opened.values():
            await channel.close()


async def refusal(call: Any) -> tuple[grpc.StatusCode, str | None, set[str]]:
    """A failed call's code, ErrorInfo reason and the fields its BadRequest names."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    status = status_of(caught.value)
    assert status is not None, caught.value
    info = error_info(status)
    fields: set[str] = set()
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.update(violation.field for violation in bad.field_violations)
    return caught.value.code(), info.reason if info else None, fields


async def test_each_service_checks_its_rules_over_grpc(channels: dict[str, grpc.aio.Channel], tokens: TestTokens) -> None:
    customer = bearer(tokens.customer(str(uuid.uuid4())))
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    customers = customer_pb2_grpc.CustomerServiceStub(channels["customer"])
    assert await refusal(customers.RegisterCustomer(customer_pb2.RegisterCustomerRequest(email="a@", full_name="A"),
                                                    timeout=5)) == (invalid, "INVALID_ARGUMENT", {"email"})
    assert await refusal(customers.GetCustomer(customer_pb2.GetCustomerRequest(customer_id=""), metadata=customer,
                                               timeout=5)) == (invalid, "INVALID_ARGUMENT", {"customer_id"})
    sessions = auth_pb2_grpc.AuthServiceStub(channels["customer"])
    assert await refusal(sessions.Logout(auth_pb2.LogoutRequest(session_id=TOO_LONG_ID), metadata=customer,
                                         timeout=5)) == (invalid, "INVALID_ARGUMENT", {"session_id"})
    accounts = account_pb2_grpc.AccountServiceStub(channels["account"])
    assert await refusal(accounts.CreateAccount(account_pb2.CreateAccountRequest(currency=""), metadata=customer,
                                                timeout=5)) == (invalid, "UNSUPPORTED_CURRENCY", {"currency"})
    assert await refusal(accounts.CloseAccount(account_pb2.CloseAccountRequest(), metadata=customer,
                                               timeout=5)) == (invalid, "INVALID_ARGUMENT", {"account_id"})
    transfers = transfer_pb2_grpc.TransferServiceStub(channels["transfer"])
    withdrawal = transfer_pb2.CreateWithdrawalRequest(request_id="r", account_id=str(uuid.uuid4()), amount=-1,
                                                      currency="US")
    assert await refusal(transfers.CreateWithdrawal(withdrawal, metadata=bearer(tokens.teller()), timeout=5)) \
        == (invalid, "INVALID_AMOUNT", {"amount", "currency"})
    assert await refusal(transfers.ListTransfers(transfer_pb2.ListTransfersRequest(account_id="a", page_size=-1),
                                                 metadata=customer, timeout=5)) \
        == (invalid, "INVALID_PAGE_SIZE", {"page_size"})
    notifications = notify_pb2_grpc.NotificationServiceStub(channels["notify"])
    assert await refusal(notifications.ListNotifications(notify_pb2.ListNotificationsRequest(page_token="t" * 513),
                                                         metadata=customer, timeout=5)) \
        == (invalid, "INVALID_PAGE_TOKEN", {"page_token"})


# --- the rules themselves -------------------------------------------------------------------

# Login and RefreshSession carry only credentials: whatever their shape, a wrong one is 401
# (BAD_CREDENTIALS, INVALID_REFRESH_TOKEN), so nothing is learned from a 400.
CREDENTIALS_ONLY = {"bank.auth.v1.LoginRequest", "bank.auth.v1.RefreshSessionRequest"}
PUBLIC_SERVICES = [customer_pb2.DESCRIPTOR.services_by_name["CustomerService"],
                   auth_pb2.DESCRIPTOR.services_by_name["AuthService"],
                   account_pb2.DESCRIPTOR.services_by_name["AccountService"],
                   transfer_pb2.DESCRIPTOR.services_by_name["TransferService"],
                   notify_pb2.DESCRIPTOR.services_by_name["NotificationService"]]


def test_every_public_request_declares_rules() -> None:
    unruled = []
    for service in PUBLIC_SERVICES:
        for method in service.methods:
            message = method.input_type
            if message.full_name in CREDENTIALS_ONLY or not message.fields:
                continue
            if not any(field.GetOptions().HasExtension(validate_pb2.field) for field in message.fields):
                unruled.append(message.full_name)
    assert unruled == [], f"public requests without buf.validate rules: {unruled}"


def test_rules_on_the_hot_path_accept_a_valid_transfer() -> None:
    # The rules must not refuse what API.md allows: the limits themselves are valid.
    limits: list[Message] = [
        transfer_pb2.CreateTransferRequest(request_id="x" * 64, from_account_id="a" * 64, to_account_id=str(uuid.uuid4()),
                                           amount=2**63 - 1, currency="JPY", description="d" * 200),
        account_pb2.CreateAccountRequest(currency="usd"),  # svc_account upper-cases it (API.md)
        customer_pb2.RegisterCustomerRequest(email="Ada.Lovelace+bank@example.co.uk", full_name="A" * 100,
                                             phone_number="+14155550123"),
        auth_pb2.CreateCredentialRequest(enrollment_token="t", username="ada_l.x-1", password="p" * 128),
        account_pb2.ListAccountsRequest(page_size=10_000, page_token="t" * 512),  # over 500: served as 500
    ]
    for request in limits:
        check_rules(request)


# --- Envoy's limits -------------------------------------------------------------------------

def test_envoy_refuses_oversize_bodies_and_headers_and_the_services_keep_working(settings: Settings,
                                                                                    tokens: TestTokens) -> None:
    customer = tokens.customer(str(uuid.uuid4()))
    huge_body = json.dumps({"email": "big@example.com", "full_name": "x" * BODY_LIMIT_BYTES}).encode()
    assert raw_request(settings, "POST", "/v1/customers", huge_body)[0] == 413
    assert raw_request(settings, "GET", "/v1/notifications",
                       headers={"authorization": f"Bearer {customer}", "x-big": "a" * HEADERS_LIMIT_BYTES})[0] == 431
    many = {f"x-header-{n}": "v" for n in range(HEADER_COUNT_LIMIT + 1)}
    assert raw_request(settings, "GET", "/v1/notifications", headers={"authorization": f"Bearer {customer}", **many})[0] == 431
    # Just under the body limit reaches the service, whose rules answer (full_name is too long).
    near_limit = json.dumps({"email": "big@example.com", "full_name": "x" * (BODY_LIMIT_BYTES - 100)}).encode()
    status, body = raw_request(settings, "POST", "/v1/customers", near_limit)
    assert status == 400 and violated_fields(json.loads(body)) == {"full_name"}
    # And the door still works for everyone.
    listed = rest(settings, "GET", "/v1/notifications", token=customer)
    assert listed.status == 200, listed.body


async def test_envoy_refuses_an_oversize_grpc_message(settings: Settings, tokens: TestTokens) -> None:
    request = transfer_pb2.CreateTransferRequest(request_id="r", from_account_id="a", to_account_id="b", amount=1,
                                                 currency="USD", description="d" * BODY_LIMIT_BYTES)
    metadata = bearer(tokens.customer(str(uuid.uuid4())))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.envoy_port}") as channel:
        transfers = transfer_pb2_grpc.TransferServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await transfers.CreateTransfer(request, metadata=metadata, timeout=5)
        # Envoy's 413 as gRPC sees it: INVALID_ARGUMENT (its local-reply mapper; Envoy alone
        # would say UNKNOWN; never RESOURCE_EXHAUSTED, "retry later"); the service never saw it.
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
        assert "Payload Too Large" in (caught.value.details() or "")
        request.description = "d" * 200
        code, reason, _ = await refusal(transfers.CreateTransfer(request, metadata=metadata, timeout=5))
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")

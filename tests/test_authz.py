"""Authorization of every route (OWASP API Security Top 10 2023: API1 broken object-level
authorization, API5 broken function-level authorization), through Envoy by REST.

The routes come from the contract itself: every method of every service Envoy routes, read from
the descriptor set (gen/bank.pb) and the rendered Envoy config. Each must have a case in CASES,
so a new route cannot be added without saying who may call it. Each case is called four ways:
without a token (401), by another customer naming the owner's object (404, exactly like a
missing object, and never a byte of the owner's data in the answer), by the teller, and by the
owner. Internal services (not routed) refuse every caller without the service token, whatever
bearer token it brings; and a client cannot smuggle the service token through Envoy.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import grpc
import pytest
from bank.customer.v1 import customer_pb2, customer_pb2_grpc

from common import auth, config
from common.config import Settings
from common.errors import error_info, status_of
from devstack.components import envoy_config
from devstack.stack import Stack
from svc_account.server import ACCESS as ACCOUNT_ACCESS
from svc_customer.server import ACCESS as CUSTOMER_ACCESS
from svc_transfer.server import ACCESS as TRANSFER_ACCESS
from tests.gateway_support import Rpc, internal_rpcs, public_rpcs
from tests.support import Customer, Response, login, onboard, rest

# Headers a client might try in order to pass for a service or the teller.
IMPERSONATION = ("x-bank-service-token", "x-bank-service", "x-bank-role")


# --- who owns what -------------------------------------------------------------------------

@dataclass
class World:
    alice: Customer  # the owner of every object the cases name
    bob: Customer  # another customer
    teller: str  # the teller's access token
    main_account: str  # alice's, funded
    second_account: str  # alice's, the target of her transfer
    closable_account: str  # alice's, empty, closed by her CloseAccount case
    freezable_account: str  # alice's, frozen and thawed by the teller's cases
    transfer_id: str  # alice main -> alice second
    spare_session: str  # alice's second session, ended by her Logout case

    def alice_identifiers(self) -> list[str]:
        """What must never appear in an answer to bob."""
        return [self.alice.customer_id, self.alice.email, self.alice.username, self.main_account,
                self.second_account, self.closable_account, self.freezable_account, self.transfer_id,
                self.spare_session, str(self.alice.session["session_id"])]


def _ok(response: Response) -> Any:
    assert response.status == 200, response.body
    return response.body


@pytest.fixture(scope="module")
def world(stack: Stack, settings: Settings) -> World:
    alice, bob = onboard(settings), onboard(settings)
    teller = login(settings, settings.teller_username, settings.teller_password)["access_token"]

    def account(customer: Customer, currency: str) -> str:
        return str(_ok(rest(settings, "POST", "/v1/accounts", {"currency": currency}, token=customer.token))["account_id"])

    main, second, closable, freezable = (account(alice, c) for c in ("USD", "USD", "EUR", "GBP"))
    account(bob, "USD")
    _ok(rest(settings, "POST", "/v1/deposits", {"request_id": uuid.uuid4().hex, "account_id": main,
                                                "amount": "10000", "currency": "USD"}, token=teller))
    transfer = _ok(rest(settings, "POST", "/v1/transfers", {"request_id": uuid.uuid4().hex, "from_account_id": main,
                                                            "to_account_id": second, "amount": "100",
                                                            "currency": "USD"}, token=alice.token))
    spare = login(settings, alice.username, alice.password)
    return World(alice, bob, teller, main, second, closable, freezable, str(transfer["transfer_id"]),
                 str(spare["session_id"]))


# --- what each public RPC allows -----------------------------------------------------------

class Kind(Enum):
    PUBLIC = "public"  # no token: its own input is the proof (a code, a password, a token)
    OWN = "own"  # names an object; only its owner may touch it (tellers may read some)
    CALLER = "caller"  # acts on the caller's own objects, named by nobody
    TELLER = "teller"  # tellers only


@dataclass(frozen=True)
class Expect:
    status: int
    reason: str | None = None


OK = Expect(200)
ANONYMOUS = Expect(401, "UNAUTHENTICATED")
TELLER_ONLY = Expect(403, "TELLER_ONLY")


@dataclass(frozen=True)
class Case:
    kind: Kind
    fields: Callable[[World], dict[str, Any]]  # the request, naming alice's objects
    other: Expect  # bob (another customer) sending it
    teller: Expect
    owner: Expect  # alice; called last, so a case may change her object


def _request_id() -> str:
    return uuid.uuid4().hex


def _fresh_hold(w: World) -> str:
    """A new PENDING hold of alice's, from her main account to her second: she is its payee, bob
    owns neither side (so it does not exist for him), and each call settles a hold of its own."""
    placed = _ok(rest(config.load(), "POST", "/v1/transfers", {
        "request_id": _request_id(), "from_account_id": w.main_account, "to_account_id": w.second_account,
        "amount": "1", "currency": "USD", "hold_seconds": 3600}, token=w.alice.token))
    return str(placed["transfer_id"])


CASES: dict[str, Case] = {
    # Customers and credentials
    "/bank.customer.v1.CustomerService/RegisterCustomer": Case(
        Kind.PUBLIC, lambda w: {"email": f"authz-{uuid.uuid4().hex[:12]}@example.com", "full_name": "Authz"},
        other=OK, teller=OK, owner=OK),
    "/bank.customer.v1.CustomerService/VerifyEmail": Case(
        Kind.PUBLIC, lambda w: {"customer_id": w.alice.customer_id, "code": "000000"},
        other=Expect(400, "ALREADY_VERIFIED"), teller=Expect(400, "ALREADY_VERIFIED"),
        owner=Expect(400, "ALREADY_VERIFIED")),
    "/bank.customer.v1.CustomerService/GetCustomer": Case(
        Kind.OWN, lambda w: {"customer_id": w.alice.customer_id},
        other=Expect(404, "CUSTOMER_NOT_FOUND"), teller=OK, owner=OK),
    "/bank.auth.v1.AuthService/CreateCredential": Case(
        Kind.PUBLIC, lambda w: {"enrollment_token": uuid.uuid4().hex, "username": f"u{uuid.uuid4().hex[:12]}",
                                "password": "a long enough passphrase"},
        other=Expect(401, "INVALID_ENROLLMENT_TOKEN"), teller=Expect(401, "INVALID_ENROLLMENT_TOKEN"),
        owner=Expect(401, "INVALID_ENROLLMENT_TOKEN")),
    "/bank.auth.v1.AuthService/Login": Case(
        Kind.PUBLIC, lambda w: {"username": w.alice.username, "password": w.alice.password},
        other=OK, teller=OK, owner=OK),
    "/bank.auth.v1.AuthService/RefreshSession": Case(
        Kind.PUBLIC, lambda w: {"refresh_token": uuid.uuid4().hex},
        other=Expect(401, "INVALID_REFRESH_TOKEN"), teller=Expect(401, "INVALID_REFRESH_TOKEN"),
        owner=Expect(401, "INVALID_REFRESH_TOKEN")),
    "/bank.auth.v1.AuthService/Logout": Case(
        Kind.OWN, lambda w: {"session_id": w.spare_session},
        other=Expect(404, "SESSION_NOT_FOUND"), teller=Expect(404, "SESSION_NOT_FOUND"), owner=OK),
    "/bank.auth.v1.AuthService/ListSessions": Case(
        Kind.OWN, lambda w: {"customer_id": w.alice.customer_id},
        other=Expect(404, "CUSTOMER_NOT_FOUND"), teller=Expect(404, "CUSTOMER_NOT_FOUND"), owner=OK),
    # Account recovery and profile (API.md v1 additions). The requests naming an email answer
    # everyone alike; a fresh address each time keeps clear of the per-email limits.
    "/bank.customer.v1.CustomerService/ResendVerificationCode": Case(
        Kind.PUBLIC, lambda w: {"email": f"authz-{uuid.uuid4().hex[:12]}@example.com"}, other=OK, teller=OK, owner=OK),
    "/bank.auth.v1.AuthService/RequestPasswordReset": Case(
        Kind.PUBLIC, lambda w: {"email": f"authz-{uuid.uuid4().hex[:12]}@example.com"}, other=OK, teller=OK, owner=OK),
    "/bank.auth.v1.AuthService/ResetPassword": Case(
        Kind.PUBLIC, lambda w: {"email": w.alice.email, "code": "000000", "new_password": "a long enough passphrase"},
        other=Expect(400, "INVALID_CODE"), teller=Expect(400, "INVALID_CODE"), owner=Expect(400, "INVALID_CODE")),
    # A wrong current password: the right one would log alice's other sessions out (spare_session).
    "/bank.auth.v1.AuthService/ChangePassword": Case(
        Kind.CALLER, lambda w: {"current_password": f"not-{w.alice.password}", "new_password": "a long enough passphrase"},
        other=Expect(401, "BAD_CREDENTIALS"), teller=Expect(403, "CUSTOMER_ONLY"), owner=Expect(401, "BAD_CREDENTIALS")),
    "/bank.customer.v1.CustomerService/UpdateCustomer": Case(
        Kind.OWN, lambda w: {"customer.customer_id": w.alice.customer_id, "customer": {"full_name": "Alice Authz"},
                             "update_mask": "full_name"},
        other=Expect(404, "CUSTOMER_NOT_FOUND"), teller=Expect(404, "CUSTOMER_NOT_FOUND"), owner=OK),
    "/bank.customer.v1.CustomerService/ChangeEmail": Case(
        Kind.OWN, lambda w: {"customer_id": w.alice.customer_id, "new_email": f"authz-{uuid.uuid4().hex[:12]}@example.com"},
        other=Expect(404, "CUSTOMER_NOT_FOUND"), teller=Expect(404, "CUSTOMER_NOT_FOUND"), owner=OK),
    # Runs after ChangeEmail (the cases run in name order), so a change is pending: a wrong code.
    "/bank.customer.v1.CustomerService/ConfirmEmailChange": Case(
        Kind.OWN, lambda w: {"customer_id": w.alice.customer_id, "code": "000000"},
        other=Expect(404, "CUSTOMER_NOT_FOUND"), teller=Expect(404, "CUSTOMER_NOT_FOUND"), owner=Expect(400)),
    # Accounts
    "/bank.account.v1.AccountService/CreateAccount": Case(
        Kind.CALLER, lambda w: {"currency": "JPY"},
        other=OK, teller=Expect(403, "CUSTOMER_ONLY"), owner=OK),
    "/bank.account.v1.AccountService/GetAccount": Case(
        Kind.OWN, lambda w: {"account_id": w.main_account},
        other=Expect(404, "ACCOUNT_NOT_FOUND"), teller=OK, owner=OK),
    "/bank.account.v1.AccountService/ListAccounts": Case(
        Kind.CALLER, lambda w: {}, other=OK, teller=OK, owner=OK),
    "/bank.account.v1.AccountService/CloseAccount": Case(
        Kind.OWN, lambda w: {"account_id": w.closable_account},
        other=Expect(404, "ACCOUNT_NOT_FOUND"), teller=Expect(404, "ACCOUNT_NOT_FOUND"), owner=OK),
    "/bank.account.v1.AccountService/FreezeAccount": Case(
        Kind.TELLER, lambda w: {"account_id": w.freezable_account, "reason": "authz test"},
        other=TELLER_ONLY, teller=OK, owner=TELLER_ONLY),
    "/bank.account.v1.AccountService/UnfreezeAccount": Case(
        Kind.TELLER, lambda w: {"account_id": w.freezable_account, "reason": "authz test"},
        other=TELLER_ONLY, teller=OK, owner=TELLER_ONLY),
    "/bank.account.v1.AccountService/ListAccountActivity": Case(
        Kind.OWN, lambda w: {"account_id": w.main_account},
        other=Expect(404, "ACCOUNT_NOT_FOUND"), teller=OK, owner=OK),
    # Money movement
    "/bank.transfer.v1.TransferService/CreateTransfer": Case(
        Kind.OWN, lambda w: {"request_id": _request_id(), "from_account_id": w.main_account,
                             "to_account_id": w.second_account, "amount": "1", "currency": "USD"},
        other=Expect(404, "ACCOUNT_NOT_FOUND"), teller=Expect(404, "ACCOUNT_NOT_FOUND"), owner=OK),
    "/bank.transfer.v1.TransferService/GetTransfer": Case(
        Kind.OWN, lambda w: {"transfer_id": w.transfer_id},
        other=Expect(404, "TRANSFER_NOT_FOUND"), teller=OK, owner=OK),
    "/bank.transfer.v1.TransferService/ListTransfers": Case(
        Kind.OWN, lambda w: {"account_id": w.main_account},
        other=Expect(404, "ACCOUNT_NOT_FOUND"), teller=OK, owner=OK),
    "/bank.transfer.v1.TransferService/PostTransfer": Case(
        Kind.OWN, lambda w: {"transfer_id": _fresh_hold(w), "request_id": _request_id()},
        other=Expect(404, "TRANSFER_NOT_FOUND"), teller=OK, owner=OK),
    "/bank.transfer.v1.TransferService/VoidTransfer": Case(
        Kind.OWN, lambda w: {"transfer_id": _fresh_hold(w), "request_id": _request_id()},
        other=Expect(404, "TRANSFER_NOT_FOUND"), teller=OK, owner=OK),
    "/bank.transfer.v1.TransferService/CreateDeposit": Case(
        Kind.TELLER, lambda w: {"request_id": _request_id(), "account_id": w.main_account, "amount": "5",
                                "currency": "USD"},
        other=TELLER_ONLY, teller=OK, owner=TELLER_ONLY),
    "/bank.transfer.v1.TransferService/CreateWithdrawal": Case(
        Kind.TELLER, lambda w: {"request_id": _request_id(), "account_id": w.main_account, "amount": "5",
                                "currency": "USD"},
        other=TELLER_ONLY, teller=OK, owner=TELLER_ONLY),
    # Notifications
    "/bank.notify.v1.NotificationService/ListNotifications": Case(
        Kind.CALLER, lambda w: {}, other=OK, teller=OK, owner=OK),
}


def test_every_public_rpc_has_an_authorization_case(settings: Settings) -> None:
    routed = public_rpcs(settings)
    assert len(routed) >= 20  # the enumeration itself works: services and methods were found
    missing, stale = sorted(set(routed) - set(CASES)), sorted(set(CASES) - set(routed))
    assert not missing, f"public RPCs without an authorization case in tests/test_authz.py: {missing}"
    assert not stale, f"cases for RPCs that are not public routes: {stale}"
    assert all(rpc.http_verb for rpc in routed.values()), "every public RPC has a REST mapping"


def test_access_levels_in_the_code_match_the_cases() -> None:
    """What each service declares (the interceptor enforces it) is what the cases expect: a
    method made public or teller-only in the code without a case saying so fails here."""
    declared = {**CUSTOMER_ACCESS, **ACCOUNT_ACCESS, **TRANSFER_ACCESS}
    authenticator = auth.Authenticator(None, None, "unused", declared)  # type: ignore[arg-type]
    expected = {Kind.PUBLIC: auth.Access.PUBLIC, Kind.OWN: auth.Access.AUTHENTICATED,
                Kind.CALLER: auth.Access.AUTHENTICATED, Kind.TELLER: auth.Access.TELLER}
    for method, case in CASES.items():
        assert authenticator.access_of(method) is expected[case.kind], method


def _rest_call(settings: Settings, rpc: Rpc, fields: dict[str, Any], token: str | None,
               headers: dict[str, str] | None = None) -> Response:
    """The request as a REST client sends it: path variables from the fields, the rest as the body."""
    path, body = rpc.http_path, dict(fields)
    for name in [part.split("}")[0] for part in path.split("{")[1:]]:
        path = path.replace(f"{{{name}}}", urllib.parse.quote(str(body.pop(name)), safe=""))
    if rpc.http_verb in ("get", "delete"):
        assert not body, f"{rpc.method}: fields left for a {rpc.http_verb}: {body}"
        return rest(settings, rpc.http_verb.upper(), path, token=token, headers=headers)
    return rest(settings, rpc.http_verb.upper(), path, body, token=token, headers=headers)


def _check(response: Response, expect: Expect, who: str, method: str) -> None:
    assert response.status == expect.status, (who, method, response.body)
    if expect.reason is not None:
        assert response.reason == expect.reason, (who, method, response.body)


def _impersonation_headers(settings: Settings) -> dict[str, str]:
    """The real service token and a service name and role, as a client might send them."""
    service_token = auth.load_keys(settings, signing=False).service_token
    return {"x-bank-service-token": service_token, "x-bank-service": "svc_account", "x-bank-role": "teller"}


@pytest.mark.parametrize("method", sorted(CASES), ids=lambda m: m.rsplit("/", 1)[1])
def test_authorization_of(world: World, settings: Settings, method: str) -> None:
    case, rpc = CASES[method], public_rpcs(settings)[method]
    anonymous = _rest_call(settings, rpc, case.fields(world), token=None)
    if case.kind is Kind.PUBLIC:
        assert anonymous.reason != "UNAUTHENTICATED", (method, anonymous.body)  # needs no token
    else:
        _check(anonymous, ANONYMOUS, "anonymous", method)

    # Another customer, with the service token and a role header thrown in: nothing of alice's.
    other = _rest_call(settings, rpc, case.fields(world), world.bob.token, _impersonation_headers(settings))
    _check(other, case.other, "another customer", method)
    answer = json.dumps(other.body)
    if case.kind is not Kind.PUBLIC:
        leaked = [value for value in world.alice_identifiers() if value in answer]
        assert not leaked, f"{method} showed another customer {leaked}: {answer}"

    _check(_rest_call(settings, rpc, case.fields(world), world.teller), case.teller, "teller", method)
    _check(_rest_call(settings, rpc, case.fields(world), world.alice.token), case.owner, "owner", method)


def test_caller_scoped_rpcs_act_for_the_caller_only(world: World, settings: Settings) -> None:
    """CreateAccount opens the account for the token's customer, whatever the request says;
    lists show the caller's own objects."""
    opened = rest(settings, "POST", "/v1/accounts", {"currency": "USD"}, token=world.bob.token)
    assert opened.status == 200 and opened.body["customer_id"] == world.bob.customer_id
    smuggled = rest(settings, "POST", "/v1/accounts", {"currency": "USD", "customer_id": world.alice.customer_id},
                    token=world.bob.token)
    assert smuggled.status == 400 or smuggled.body["customer_id"] == world.bob.customer_id, smuggled.body
    mine = _ok(rest(settings, "GET", "/v1/accounts", token=world.alice.token))
    assert world.main_account in {a["account_id"] for a in mine["accounts"]}
    theirs = _ok(rest(settings, "GET", "/v1/accounts", token=world.bob.token))
    assert theirs["accounts"] and all(a["customer_id"] == world.bob.customer_id for a in theirs["accounts"])
    notes = _ok(rest(settings, "GET", "/v1/notifications", token=world.bob.token))["notifications"]
    assert notes and {n["recipient"] for n in notes} == {world.bob.email}


def test_another_customers_transfer_attempt_moves_nothing(world: World, settings: Settings) -> None:
    """The idempotency key is scoped to the caller: bob reusing alice's request_id neither gets
    her transfer back nor moves her money."""
    request_id = _request_id()
    body = {"request_id": request_id, "from_account_id": world.main_account, "to_account_id": world.second_account,
            "amount": "7", "currency": "USD"}
    before = _ok(rest(settings, "GET", f"/v1/accounts/{world.main_account}", token=world.alice.token))["balance"]
    moved = _ok(rest(settings, "POST", "/v1/transfers", body, token=world.alice.token))
    replay = rest(settings, "POST", "/v1/transfers", body, token=world.bob.token)
    assert replay.status == 404 and replay.reason == "ACCOUNT_NOT_FOUND" and moved["transfer_id"] not in json.dumps(replay.body)
    after = _ok(rest(settings, "GET", f"/v1/accounts/{world.main_account}", token=world.alice.token))["balance"]
    assert int(before) - int(after) == 7


# --- internal services ---------------------------------------------------------------------

def _service_port(settings: Settings, method: str) -> int:
    """An internal service runs in the process of its package's area (bank.<area>.v1)."""
    area = method.lstrip("/").split(".")[1]
    return int(getattr(settings, f"{area}_grpc_port"))


async def _call_raw(address: str, method: str, metadata: list[tuple[str, str]]) -> grpc.StatusCode:
    """Calls method with an empty request; the status code it answers."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method, request_serializer=lambda _: b"", response_deserializer=lambda raw: raw)
        try:
            await call(b"", metadata=metadata, timeout=5)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.PERMISSION_DENIED:
                status = status_of(error)
                info = error_info(status) if status is not None else None
                assert info is not None and info.reason == "SERVICE_ONLY", error
            return error.code()
    return grpc.StatusCode.OK


def test_internal_services_are_found(settings: Settings) -> None:
    names = {rpc.method.split("/")[1] for rpc in internal_rpcs(settings)}
    assert {"bank.customer.v1.CustomerInternalService", "bank.transfer.v1.LedgerService"} <= names
    assert all(not rpc.http_verb for rpc in internal_rpcs(settings)), "internal RPCs have no REST mapping"


@pytest.mark.parametrize("method", [rpc.method for rpc in internal_rpcs(config.load())], ids=lambda m: m.rsplit("/", 1)[1])
async def test_internal_rpc_needs_the_service_token(world: World, settings: Settings, method: str) -> None:
    direct = f"127.0.0.1:{_service_port(settings, method)}"
    service_token = auth.load_keys(settings, signing=False).service_token
    refused_with = {
        "nothing": [],
        "a customer's token": [("authorization", f"Bearer {world.alice.token}")],
        "the teller's token": [("authorization", f"Bearer {world.teller}")],
        "a wrong service token": [("x-bank-service-token", "not-the-token"), ("x-bank-service", "svc_account")],
        "a service name alone": [("x-bank-service", "svc_account")],
    }
    for what, metadata in refused_with.items():
        assert await _call_raw(direct, method, metadata) == grpc.StatusCode.PERMISSION_DENIED, what
    # The real token passes the check (the empty request is then refused or answered, never denied).
    assert await _call_raw(direct, method, [("x-bank-service-token", service_token)]) != grpc.StatusCode.PERMISSION_DENIED
    # Through Envoy there is no route at all, even with the real token.
    through_gateway = await _call_raw(f"127.0.0.1:{settings.envoy_port}", method, [("x-bank-service-token", service_token)])
    assert through_gateway == grpc.StatusCode.UNIMPLEMENTED


# --- Envoy strips the headers only services may send -----------------------------------------

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _echo_get_customer(request: customer_pb2.GetCustomerRequest, context: grpc.ServicerContext) -> customer_pb2.Customer:
    """GetCustomer answered with the metadata that reached the upstream (in full_name)."""
    metadata = [[key, value] for key, value in context.invocation_metadata() or () if isinstance(value, str)]
    return customer_pb2.Customer(customer_id=request.customer_id, full_name=json.dumps(metadata))


@pytest.fixture
def gateway_with_echo(settings: Settings, tmp_path: Path) -> Iterator[int]:
    """A second Envoy from the same template, in front of an echo of svc_customer's API (a
    plain threaded gRPC server: the test's own calls block while it answers)."""
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bank.customer.v1.CustomerService", {
        "GetCustomer": grpc.unary_unary_rpc_method_handler(
            _echo_get_customer, request_deserializer=customer_pb2.GetCustomerRequest.FromString,
            response_serializer=customer_pb2.Customer.SerializeToString)})])
    echo_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    # Every Envoy port of the settings (the plain and the TLS listener, admin) moved to a free one.
    ports: dict[str, Any] = {f.name: _free_port() for f in dataclasses.fields(settings)
                             if f.name.startswith("envoy") and f.name.endswith("port")}
    private = dataclasses.replace(settings, **ports, customer_processes=1,
                                  customer_grpc_port=echo_port - (settings.private_grpc_port("customer", 0)
                                                                  - settings.customer_grpc_port))
    assert private.private_grpc_port("customer", 0) == echo_port
    conf = tmp_path / "envoy.yaml"
    conf.write_text(envoy_config(private))
    envoy = subprocess.Popen([str(Path(sys.executable).parent / "envoy"), "-c", str(conf), "--base-id",
                              str(private.envoy_admin_port), "--concurrency", "1", "--log-level", "error"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{private.envoy_admin_port}/ready", timeout=1) as ready:
                    if ready.read().strip() == b"LIVE":
                        break
            except OSError:
                pass
            assert envoy.poll() is None and time.monotonic() < deadline, "the test Envoy did not start"
            time.sleep(0.1)
        yield private.envoy_port
    finally:
        envoy.terminate()
        envoy.wait(timeout=10)
        server.stop(0)


def test_envoy_strips_service_headers_from_clients(settings: Settings, gateway_with_echo: int) -> None:
    """Whatever x-bank-* header a client sends never reaches a service with the client's value
    (Envoy may set some itself, after removing the client's); other headers pass."""
    port = gateway_with_echo
    sent = {"authorization": "Bearer a-token", "x-request-id": "authz-echo", "x-other": "kept",
            "x-bank-service-token": "guess", "x-bank-service": "svc-guess", "x-bank-role": "teller-guess",
            "x-bank-client-address": "198.51.100.66", "X-Bank-Customer-Id": "id-guess"}
    customer_id = str(uuid.uuid4())
    by_rest = rest(dataclasses.replace(settings, envoy_port=port), "GET", f"/v1/customers/{customer_id}", headers=sent)
    assert by_rest.status == 200, by_rest.body
    by_rest_metadata = json.loads(by_rest.body["full_name"])

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = customer_pb2_grpc.CustomerServiceStub(channel).GetCustomer(
            customer_pb2.GetCustomerRequest(customer_id=customer_id),
            metadata=[(key.lower(), value) for key, value in sent.items()], timeout=5)
    by_grpc_metadata = json.loads(reply.full_name)

    client_values = {value for key, value in sent.items() if key.lower().startswith("x-bank-")}
    for received in (by_rest_metadata, by_grpc_metadata):
        smuggled = [(key, value) for key, value in received if key.startswith("x-bank-") and value in client_values]
        assert not smuggled, received
        assert {"authorization", "x-request-id", "x-other"} <= {key for key, _ in received}, received


def test_the_running_gateway_strips_service_headers(stack: Stack, settings: Settings) -> None:
    """The Envoy in front of the stack runs the template's header removal (not an older config)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{settings.envoy_admin_port}/config_dump", timeout=5) as dump:
        text = dump.read().decode()
    assert "envoy.filters.http.header_mutation" in text and '"prefix": "x-bank-"' in text

"""The OpenAPI document: served by Envoy at /openapi.json, the generated gen/bank.swagger.json,
and complete: every public route of API.md, with the operation of the RPC API.md names, and
nothing of the internal services. Also Envoy's own error replies, which the document promises are google.rpc.Status
JSON like every service error."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from typing import Any

import pytest

from common.config import REPO_ROOT, Settings
from devstack.stack import Stack
from tests.support import rest

API_MD = REPO_ROOT.parent / "shared" / "API.md"
GENERATED = REPO_ROOT / "gen" / "bank.swagger.json"
# API.md runs ahead of the code: its "v1 additions" are open issues. Exactly the routes not built
# yet, with their issue; this list shrinks to empty as they land, and nothing else is skipped.
NOT_BUILT_YET: dict[tuple[str, str], str] = {}
# A table row of API.md: | Service.Rpc[ / OtherRpc] | METHOD /path[, :verb] `{body}` | notes |
ROW = re.compile(r"^\| (\w+)\.(\w+)(?: / (\w+))? \| (GET|POST|DELETE|PUT|PATCH) (/\S+?)(?:, :(\w+))?(?: `.*?`)? \|",
                 re.MULTILINE)


def api_md_routes() -> dict[tuple[str, str], str]:
    """(METHOD, path) -> "Service_Rpc" for every REST route of API.md's tables."""
    if not API_MD.is_file():
        pytest.skip(f"no {API_MD}: the contract lives in the shared folder beside the repo")
    routes = {}
    for service, rpc, second_rpc, method, path, second_verb in ROW.findall(API_MD.read_text()):
        routes[method, path] = f"{service}_{rpc}"
        if second_rpc:  # "FreezeAccount / UnfreezeAccount | POST /v1/accounts/{account_id}:freeze, :unfreeze"
            routes[method, path.rsplit(":", 1)[0] + ":" + second_verb] = f"{service}_{second_rpc}"
    assert len(routes) >= 20, f"API.md's tables no longer parse: {routes}"
    return routes


def served(settings: Settings) -> tuple[str, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{settings.envoy_port}/openapi.json", timeout=5) as response:
        return str(response.headers["content-type"]), response.read()


def test_envoy_serves_the_generated_document(stack: Stack, settings: Settings) -> None:
    content_type, body = served(settings)
    assert content_type == "application/json"
    assert json.loads(body) == json.loads(GENERATED.read_text()), (
        "Envoy serves another document than gen/bank.swagger.json: it reads the file when it starts")


def test_the_document_lists_every_public_route_of_api_md(stack: Stack, settings: Settings) -> None:
    document: dict[str, Any] = json.loads(served(settings)[1])
    assert document["swagger"] == "2.0"
    operations = {
        (method.upper(), path): operation for path, methods in document["paths"].items()
        for method, operation in methods.items()
    }
    expected = api_md_routes()
    assert NOT_BUILT_YET.keys() <= expected.keys(), "a route of NOT_BUILT_YET is no longer in API.md"
    served_already = NOT_BUILT_YET.keys() & operations.keys()
    assert not served_already, f"built now: take them off NOT_BUILT_YET: {sorted(served_already)}"
    expected = {route: operation for route, operation in expected.items() if route not in NOT_BUILT_YET}
    assert sorted(expected.keys() - operations.keys()) == []
    for route, operation_id in expected.items():
        assert operations[route]["operationId"] == operation_id, route
    # Internal services have no route, so nothing of theirs may show.
    assert not re.search(r"Internal|Ledger", json.dumps(sorted(operations[route]["operationId"] for route in operations)))


def test_the_document_states_auth_errors_and_field_names_as_envoy_speaks(stack: Stack, settings: Settings) -> None:
    document: dict[str, Any] = json.loads(served(settings)[1])
    assert document["securityDefinitions"]["bearer"] == {
        "type": "apiKey", "in": "header", "name": "Authorization", "description": document["securityDefinitions"]["bearer"]["description"]}
    no_token = {"CustomerService_RegisterCustomer", "CustomerService_VerifyEmail", "AuthService_CreateCredential",
                "AuthService_Login", "AuthService_RefreshSession", "CustomerService_ResendVerificationCode",
                "AuthService_RequestPasswordReset", "AuthService_ResetPassword"}
    for methods in document["paths"].values():
        for operation in methods.values():
            responses = operation["responses"]
            # Every error is a google.rpc.Status, and nothing hides behind a catch-all "default".
            assert "default" not in responses
            assert all(responses[status]["schema"] == {"$ref": "#/definitions/rpc.Status"}
                       for status in responses if status != "200")
            assert {"400", "429"} <= responses.keys()
            if operation["operationId"] in no_token:
                assert operation["security"] == []
            else:
                assert "security" not in operation and "401" in responses  # the document's bearer applies
    transfer = document["definitions"]["Transfer"]["properties"]
    # snake_case (preserve_proto_field_names), int64 as a string, enums by name, as Envoy prints them.
    assert {"transfer_id", "from_account_id", "create_time"} <= transfer.keys()
    assert transfer["amount"]["type"] == "string" and transfer["amount"]["format"] == "int64"
    assert document["definitions"]["Transfer.Status"]["enum"] == ["STATUS_UNSPECIFIED", "COMPLETED", "PENDING", "VOIDED",
                                                                  "EXPIRED"]
    # The buf.validate rules of the protos are the request schemas' rules.
    create = document["definitions"]["CreateTransferRequest"]
    assert {"request_id", "from_account_id", "to_account_id"} <= set(create["required"])
    assert create["properties"]["request_id"]["maxLength"] == 64


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), [
    ("POST", "/v1/customers", b"{not json", 400, 3),  # the transcoder cannot parse the body
    ("POST", "/v1/customers", b'{"email": 5}', 400, 3),  # a number for a string field
    ("GET", "/v1/accounts?no_such_parameter=1", None, 400, 3),  # unknown query parameter
    ("GET", "/v1/no-such-route", None, 404, 5),
])
def test_envoys_own_errors_are_google_rpc_status_json(stack: Stack, settings: Settings, method: str, path: str,
                                                      body: bytes | None, status: int, code: int) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{settings.envoy_port}{path}", data=body, method=method,
                                     headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=5)
    assert raised.value.code == status
    assert raised.value.headers["content-type"] == "application/json"
    error = json.loads(raised.value.read())
    assert error["code"] == code and error["message"]


@pytest.mark.parametrize("header", ["x-bad*name", "x-trace-bin", "grpc-timeout"])
def test_headers_grpc_cannot_carry_are_dropped_from_rest_requests(stack: Stack, settings: Settings, header: str) -> None:
    """They used to reach the service as gRPC metadata, which failed the call: a 500."""
    response = rest(settings, "GET", "/v1/accounts", headers={header: "!not base64, not a timeout"})
    assert response.status == 401, response.body  # reached the service, which asks for a token
    assert response.body["code"] == 16

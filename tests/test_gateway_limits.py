"""What the gateway answers to oversized requests and to a query that names a path field
(API.md conventions; issue #13 points 1, 4 and 6). Through the running Envoy, REST and gRPC."""

from __future__ import annotations

import json
import urllib.parse
import uuid
from typing import Any

import pytest

from common.config import Settings
from devstack.stack import Stack
from tests.gateway_support import (
    BODY_LIMIT_BYTES,
    HEADER_COUNT_LIMIT,
    HEADERS_LIMIT_BYTES,
    SERVICES,
    Rpc,
    public_rpcs,
    raw_request,
)
from tests.support import Customer, Response, onboard, rest

# Headers Envoy or the bank add on the way to a service: an answer must never name them.
INTERNAL_HEADERS = ("x-bank-", "x-envoy-", "x-forwarded-for", "x-request-id", "metadata size")


@pytest.fixture(scope="module")
def customer(stack: Stack, settings: Settings) -> Customer:
    return onboard(settings)


def _refusal(status: int, body: bytes) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(body)
    assert not any(name in json.dumps(error).lower() for name in INTERNAL_HEADERS), error
    return error


def _reason(error: dict[str, Any]) -> str | None:
    return next((d["reason"] for d in error.get("details", []) if d["@type"].endswith("ErrorInfo")), None)


# --- oversized requests (points 1 and 6) -----------------------------------------------------

def test_a_header_section_over_the_limit_is_431_invalid_argument_with_a_reason(settings: Settings,
                                                                               customer: Customer) -> None:
    for headers in ({"x-big": "a" * HEADERS_LIMIT_BYTES},
                    {f"x-header-{n}": "v" for n in range(HEADER_COUNT_LIMIT + 1)},
                    {"authorization": "Bearer " + "x" * HEADERS_LIMIT_BYTES}):
        status, body = raw_request(settings, "GET", "/v1/accounts",
                                   headers={"authorization": f"Bearer {customer.token}", **headers})
        error = _refusal(status, body)
        assert status == 431 and error["code"] == 3 and _reason(error) == "HEADERS_TOO_LARGE", (status, error)
    # A path that alone fills the header section: the same.
    status, body = raw_request(settings, "GET", f"/v1/accounts?page_token={'A' * HEADERS_LIMIT_BYTES}",
                               headers={"authorization": f"Bearer {customer.token}"})
    assert status == 431 and _reason(_refusal(status, body)) == "HEADERS_TOO_LARGE"


def test_a_body_over_the_limit_is_413_invalid_argument_with_a_reason(settings: Settings) -> None:
    body = json.dumps({"email": "big@example.com", "full_name": "x" * BODY_LIMIT_BYTES}).encode()
    status, answer = raw_request(settings, "POST", "/v1/customers", body)
    error = _refusal(status, answer)
    assert status == 413 and error["code"] == 3 and _reason(error) == "BODY_TOO_LARGE", (status, error)


LIST_ROUTES = ["/v1/accounts", "/v1/notifications", "/v1/customers/{customer_id}/sessions",
               "/v1/accounts/{account_id}/transfers", "/v1/accounts/{account_id}/activity"]


@pytest.mark.parametrize("length", [8_000, 9_000, 10_000, 12_000])
def test_long_page_tokens_are_400_every_time_never_429(settings: Settings, customer: Customer, length: int) -> None:
    """The probe's 9,000-character token got 8 x 400 and 4 x 429 of 12: the services' gRPC
    metadata limit (8 KiB soft, refused at random above) sat below Envoy's header limit."""
    account = rest(settings, "POST", "/v1/accounts", {"currency": "USD"}, token=customer.token).body["account_id"]
    for route in LIST_ROUTES:
        path = route.format(customer_id=customer.customer_id, account_id=account)
        answers = [rest(settings, "GET", f"{path}?page_token={'A' * length}", token=customer.token) for _ in range(4)]
        assert {(a.status, a.reason) for a in answers} == {(400, "INVALID_PAGE_TOKEN")}, \
            (route, [(a.status, a.body) for a in answers])


def test_a_14_kb_authorization_header_is_401_every_time_never_429(settings: Settings) -> None:
    answers = [rest(settings, "GET", "/v1/accounts", headers={"Authorization": "Bearer " + "x" * 14_000})
               for _ in range(12)]
    assert {(a.status, a.reason) for a in answers} == {(401, "INVALID_TOKEN")}, [a.body for a in answers]
    assert all("metadata size" not in json.dumps(a.body) for a in answers)


# --- a query parameter never overrides a path field (point 4) --------------------------------

def _routes_with_a_path_field(settings: Settings) -> list[Rpc]:
    return sorted((rpc for rpc in public_rpcs(settings).values() if "{" in rpc.http_path), key=lambda r: r.method)


def test_every_path_field_is_named_after_its_collection(settings: Settings) -> None:
    """The gateway's check (envoy/envoy.yaml.tmpl, the Lua filter before the transcoder) knows a
    route's path field from the path itself: /v1/<things>/{thing_id}. A route breaking that
    convention would pass a query override unnoticed: it must fail here first."""
    routes = _routes_with_a_path_field(settings)
    assert len(routes) >= 10 and SERVICES
    for rpc in routes:
        segments = rpc.http_path.split("/")
        [field] = [part.split("}")[0].strip("{") for part in segments if part.startswith("{")]
        collection = segments[2]
        assert field.split(".")[-1] == f"{collection[:-1]}_id", (rpc.method, rpc.http_path)


@pytest.mark.parametrize("spelling", ["{field}", "{json}", "{upper}", "{encoded}"])
def test_naming_a_path_field_in_the_query_is_400_on_every_route(settings: Settings, customer: Customer,
                                                               spelling: str) -> None:
    other = str(uuid.uuid4())
    for rpc in _routes_with_a_path_field(settings):
        field = rpc.http_path.split("{")[1].split("}")[0]
        last = field.split(".")[-1]
        head, _, tail = last.partition("_")
        name = spelling.format(field=field, json=head + tail.title(), upper=field.upper(),
                               encoded=urllib.parse.quote(field.replace("_", "%5F"), safe="%"))
        path = rpc.http_path.replace(f"{{{field}}}", customer.customer_id)
        verb = rpc.http_verb.upper()
        body: dict[str, Any] | None = None if verb in ("GET", "DELETE") else {}
        answer: Response = rest(settings, verb, f"{path}?{name}={other}", body, token=customer.token)
        assert answer.status == 400 and answer.reason == "INVALID_ARGUMENT", (rpc.method, name, answer.body)
        assert field.split(".")[-1] in answer.body["message"]


def test_the_owner_still_reaches_the_path_object_without_the_query(settings: Settings, customer: Customer) -> None:
    """The probe's case: GET /v1/accounts/<A>?account_id=<B> answered B's account."""
    mine = rest(settings, "POST", "/v1/accounts", {"currency": "EUR"}, token=customer.token).body["account_id"]
    other = rest(settings, "POST", "/v1/accounts", {"currency": "GBP"}, token=customer.token).body["account_id"]
    assert rest(settings, "GET", f"/v1/accounts/{mine}", token=customer.token).body["account_id"] == mine
    refused = rest(settings, "GET", f"/v1/accounts/{mine}?account_id={other}", token=customer.token)
    assert refused.status == 400 and refused.reason == "INVALID_ARGUMENT", refused.body
    # Other query parameters still pass to the transcoder as before.
    listed = rest(settings, "GET", f"/v1/accounts/{mine}/transfers?page_size=1", token=customer.token)
    assert listed.status == 200, listed.body

"""Schemathesis fuzzes the REST API through Envoy from the generated OpenAPI document.

Every public operation gets schemathesis' coverage cases (boundary and malformed values of each
field) and a few random ones, with a fixed seed, as a real customer (the teller for the
teller-only operations). Each response must be: not a 5xx, a documented status, a documented
content type, a body that matches the documented schema (google.rpc.Status for errors), and,
where the operation needs a token, refused without one or with a forged one (ignored_auth).

Random ids almost always miss, so every other case of an operation gets real ids, the matching
currency, a fresh idempotency key and one of three amounts put in place of what was generated:
that takes the fuzz past "not found" into the business rules, while the other fields stay as
generated. The last tests pin the bugs fuzzing led to.
"""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_schema_conformance,
    status_code_conformance,
)

from common import config
from common.config import REPO_ROOT, Settings
from devstack.stack import Stack
from tests import figures
from tests.events_support import Holder, deposit, holder, open_account, transfer, withdraw
from tests.support import login, rest, unique_email

SEED = 20261124
# Random cases per operation, on top of the coverage cases (deterministic, a few dozen at most).
MAX_EXAMPLES = 8
TELLER_OPERATIONS = frozenset({
    "AccountService_FreezeAccount",
    "AccountService_UnfreezeAccount",
    "TransferService_CreateDeposit",
    "TransferService_CreateWithdrawal",
})
# Every failed Login counts against the caller's address in the login rate limit: Login gets only
# a handful of random cases and no coverage cases, so the whole run sends a few Login requests.
LOGIN = "AuthService_Login"
LOGIN_MAX_EXAMPLES = 5
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          ignored_auth]


@dataclass
class World:
    """Real objects the fuzz can aim at, and what it sent."""

    customer_token: str
    teller_token: str
    # Field or path parameter name -> a real value, for customer operations and teller ones.
    customer_ids: dict[str, str]
    teller_ids: dict[str, str]
    requests: Counter[str]
    # (operation id, HTTP status) -> responses
    statuses: Counter[tuple[str, int]]


@pytest.fixture(scope="module")
def world(stack: Stack, settings: Settings) -> Iterator[World]:
    owner = holder(settings, "USD")
    other = holder(settings, "USD")
    teller_token = str(login(settings, settings.teller_username, settings.teller_password)["access_token"])
    deposit(settings, teller_token, owner.account_id, 1_000_000)
    moved = transfer(settings, owner, other, 1_000)
    # The teller operations aim at a separate account, so a fuzzed freeze does not stop the
    # customer's own movements.
    teller_target = Holder(owner.customer, open_account(settings, owner.customer, "GBP"))
    world = World(
        customer_token=owner.token,
        teller_token=teller_token,
        customer_ids={
            "customer_id": owner.customer.customer_id,
            "account_id": owner.account_id,
            "from_account_id": owner.account_id,
            "to_account_id": other.account_id,
            "transfer_id": str(moved["transfer_id"]),
            "currency": "USD",
        },
        teller_ids={"account_id": teller_target.account_id, "currency": "GBP"},
        requests=Counter(),
        statuses=Counter(),
    )
    yield world
    # Fuzzed deposits came out of the bank's GBP cash account, which other tests expect near zero
    # (test_transfer.py moves int64's largest amount through it): the money goes back.
    rest(settings, "POST", f"/v1/accounts/{teller_target.account_id}:unfreeze", {"reason": "fuzz cleanup"},
         token=teller_token)
    balance = int(rest(settings, "GET", f"/v1/accounts/{teller_target.account_id}", token=owner.token).body["balance"])
    if balance:
        withdraw(settings, teller_token, teller_target.account_id, balance, "GBP")


# Loaded when pytest collects, before the stack fixture runs, so from the generated file that
# Envoy serves at /openapi.json (tests/test_openapi.py checks the two are the same). Requests go
# to Envoy. (schemathesis.pytest.from_fixture, which would load it from Envoy, does not run on
# pytest 9.2: it sets a node attribute pytest renamed.)
def _document() -> dict[str, Any]:
    """The generated document, with a path parameter named after a nested field
    (`{customer.customer_id}`, UpdateCustomer's, AIP-134) renamed to its last part: schemathesis
    fills path templates with str.format, which reads a dot as an attribute. The URL is the same."""
    document: dict[str, Any] = json.loads((REPO_ROOT / "gen" / "bank.swagger.json").read_text())
    for path in list(document["paths"]):
        dotted = re.findall(r"\{(\w+(?:\.\w+)+)\}", path)
        if not dotted:
            continue
        renamed = path
        for name in dotted:
            renamed = renamed.replace(f"{{{name}}}", f"{{{name.rsplit('.', 1)[1]}}}")
        item = document["paths"].pop(path)
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "path" and parameter["name"] in dotted:
                    parameter["name"] = parameter["name"].rsplit(".", 1)[1]
        document["paths"].setdefault(renamed, {}).update(item)  # GET /v1/customers/{customer_id} is there
    return document


schema = schemathesis.openapi.from_dict(
    _document(),
    config=SchemathesisConfig.from_dict({
        "seed": SEED,
        # Nothing kept between runs: the same seed gives the same cases.
        "cache": {"enabled": False},
        "base-url": f"http://127.0.0.1:{config.load().envoy_port}",
        # The document has no examples; stateful testing runs only under the CLI.
        "phases": {"examples": {"enabled": False}, "stateful": {"enabled": False}},
        "generation": {"max-examples": MAX_EXAMPLES, "database": "none"},
        "operations": [{
            "include-operation-id": LOGIN,
            "phases": {"coverage": {"enabled": False}},
            "generation": {"max-examples": LOGIN_MAX_EXAMPLES, "database": "none"},
        }],
    }),
)


# Fields whose aimed value must be new each time: an idempotency key, an email to register.
FRESH: dict[str, Callable[[], str]] = {"request_id": lambda: uuid.uuid4().hex, "email": lambda: unique_email("fuzz")}
# Aimed amounts, in turn: the rule "> 0" is CEL, which the document cannot state, so generated
# amounts are mostly 0 or negative. These are the smallest, an ordinary one, and int64's largest
# (customer operations only: a teller deposit of it would leave the cash account at its limit).
AMOUNTS = ("1", "2500", "9223372036854775807")
TELLER_AMOUNTS = ("1", "2500")


def aim(case: Any, ids: dict[str, str], amounts: tuple[str, ...], number: int) -> None:
    """On every other case, put real ids (and fresh keys) in place of the generated ones, where
    the names match."""
    if number % 2 == 0:
        return
    ids = {**ids, **{name: make() for name, make in FRESH.items()}, "amount": amounts[number // 2 % len(amounts)]}
    for name in case.path_parameters or {}:
        if name in ids:
            case.path_parameters[name] = ids[name]
    if isinstance(case.body, dict):
        for name in case.body:
            if name in ids:
                case.body[name] = ids[name]


@schema.parametrize()
def test_fuzz(case: Any, world: World) -> None:
    operation_id = str(case.operation.definition.raw["operationId"])
    teller = operation_id in TELLER_OPERATIONS
    aim(case, world.teller_ids if teller else world.customer_ids, TELLER_AMOUNTS if teller else AMOUNTS,
        world.requests[operation_id])
    world.requests[operation_id] += 1
    headers = {"Authorization": f"Bearer {world.teller_token if teller else world.customer_token}",
               "x-request-id": f"fuzz-{uuid.uuid4().hex[:12]}"}
    response = case.call(headers=headers, timeout=15)
    world.statuses[operation_id, response.status_code] += 1
    case.validate_response(response, checks=CHECKS, headers=headers)


def test_the_fuzz_reached_every_operation_and_few_logins(world: World) -> None:
    """Runs after the fuzz (same module, file order): its numbers, and that it really ran."""
    operation_ids = {str(result.ok().definition.raw["operationId"])
                     for result in schema.get_all_operations() if isinstance(result, Ok)}
    by_status = Counter[int]()
    for (_, status), count in world.statuses.items():
        by_status[status] += count
    figures.report(f"fuzz: {len(world.requests)} operations, {world.requests.total()} requests, "
                   f"statuses {dict(sorted(by_status.items()))}, Login requests {world.requests[LOGIN]}")
    for operation_id in sorted(operation_ids):
        answers = {status: count for (name, status), count in sorted(world.statuses.items()) if name == operation_id}
        print(f"  {operation_id}: {world.requests[operation_id]} requests, {answers}")
    assert set(world.requests) == operation_ids
    assert all(count >= 2 for count in world.requests.values()), world.requests
    assert world.requests[LOGIN] <= LOGIN_MAX_EXAMPLES
    # The fuzz got past authentication and "not found" into real answers.
    assert by_status[200] > 0 and by_status[400] > 0


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/v1/transfers", {"request_id": "r\u0000", "description": "x"}),
    ("POST", "/v1/transfers", {"request_id": "r", "description": "a\u0000b"}),
    ("POST", "/v1/sessions", {"username": "a\u0000b", "password": "x"}),
    ("GET", "/v1/accounts/%FF%FE", None),
    ("GET", "/v1/notifications?page_token=%C3%28", None),
    ("DELETE", "/v1/sessions/%FF", None),
])
def test_nul_characters_and_bytes_that_are_not_utf8_are_invalid_arguments(
        world: World, settings: Settings, method: str, path: str, body: dict[str, str] | None) -> None:
    """Found by fuzzing: NUL reached PostgreSQL (INTERNAL) and non-UTF-8 path or query bytes
    failed protobuf decoding inside gRPC (UNKNOWN), both a 500. Now both are 400 INVALID_ARGUMENT."""
    if body is not None and path == "/v1/transfers":
        body = {**body, "from_account_id": world.customer_ids["from_account_id"],
                "to_account_id": world.customer_ids["to_account_id"], "amount": "1", "currency": "USD"}
    response = rest(settings, method, path, body, token=world.customer_token)
    assert response.status == 400, response.body
    assert response.body["code"] == 3 and response.reason == "INVALID_ARGUMENT"

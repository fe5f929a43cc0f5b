"""Account recovery and profile (API.md, "v1 additions"; issue #13), black-box through Envoy with
the codes read from Mailpit: re-registering an unverified email, ResendVerificationCode,
RequestPasswordReset / ResetPassword, ChangePassword, UpdateCustomer, ChangeEmail /
ConfirmEmailChange. The requests without a token that name an email must answer alike for known
and unknown addresses (the timing half is measured by perf/bench_recovery.py, not asserted here).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import psycopg
import pytest
from bank.auth.v1 import auth_pb2, auth_pb2_grpc
from bank.customer.v1 import customer_pb2, customer_pb2_grpc

from common import ratelimit
from common.config import Settings
from common.errors import reason_of, retry_info, status_of
from devstack.stack import Stack
from svc_customer import store
from svc_customer.service import CODE_REQUESTS_PER_ADDRESS_MAX, CODE_REQUESTS_PER_EMAIL_MAX, UNVERIFIED_TTL
from tests.support import (
    STRONG_PASSWORD,
    Customer,
    Response,
    login,
    mail_count,
    mailpit_messages,
    onboard,
    register,
    rest,
    unique_email,
    wait_for_code,
)

RESET = "Password reset code"
NEW_PASSWORD = "a-brand-new-passphrase"
RETRY_INFO_TYPE = "type.googleapis.com/google.rpc.RetryInfo"


def _other_code(code: str) -> str:
    return f"{(int(code) + 1) % 1_000_000:06d}"


def _sql(settings: Settings, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    """Test set-up and read-back straight in svc_customer's schema (e.g. to age a row)."""
    with psycopg.connect(settings.pg_conninfo, autocommit=True) as conn:
        cursor = conn.execute(statement, params)  # type: ignore[call-overload]
        return cursor.fetchall() if cursor.description else []


def _subjects(settings: Settings, email: str) -> list[str]:
    return [m["Subject"] for m in mailpit_messages(settings, f'to:"{email}"')]


def _wait_for_subject(settings: Settings, email: str, subject: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while subject not in _subjects(settings, email):
        assert time.monotonic() < deadline, f"no '{subject}' email for {email}: {_subjects(settings, email)}"
        time.sleep(0.2)


def _assert_notified(settings: Settings, token: str, kinds: set[str]) -> None:
    """The customer's own notification list shows these kinds (API.md's new ones among them);
    the record is written just after the email is handed to Mailpit."""
    deadline = time.monotonic() + 15
    while True:
        listed = rest(settings, "GET", "/v1/notifications", token=token)
        assert listed.status == 200, listed.body
        if kinds <= {n["kind"] for n in listed.body["notifications"]}:
            return
        assert time.monotonic() < deadline, (kinds, listed.body)
        time.sleep(0.2)


def _retry_delay_s(response: Response) -> float:
    [retry] = [d for d in response.body["details"] if d["@type"] == RETRY_INFO_TYPE]
    return float(retry["retry_delay"].rstrip("s"))


def _verify(settings: Settings, customer_id: str, code: str) -> Response:
    return rest(settings, "POST", f"/v1/customers/{customer_id}:verifyEmail", {"code": code})


def _reset(settings: Settings, email: str, code: str, new_password: str = NEW_PASSWORD) -> Response:
    return rest(settings, "POST", "/v1/credentials:resetPassword",
                {"email": email, "code": code, "new_password": new_password})


def _request_reset(settings: Settings, email: str) -> Response:
    return rest(settings, "POST", "/v1/credentials:requestPasswordReset", {"email": email})


def _resend(settings: Settings, email: str) -> Response:
    return rest(settings, "POST", "/v1/customers:resendVerificationCode", {"email": email})


# --- RegisterCustomer (changed) ------------------------------------------------------------

def test_an_unverified_email_is_not_taken_and_only_the_newest_registration_counts(stack: Stack,
                                                                                   settings: Settings) -> None:
    email = unique_email("squat")
    squatter = register(settings, email)
    squatter_code = wait_for_code(settings, email)
    owner = register(settings, email)  # the address's owner, registering after the squatter
    assert owner["customer_id"] != squatter["customer_id"] and owner["email_verified"] is False
    owner_code = wait_for_code(settings, email, count=2)
    # The first registration is gone: its code verifies nothing.
    gone = _verify(settings, squatter["customer_id"], squatter_code)
    assert gone.status == 404 and gone.reason == "CUSTOMER_NOT_FOUND", gone.body
    verified = _verify(settings, owner["customer_id"], owner_code)
    assert verified.status == 200 and verified.body["customer"]["email_verified"] is True
    # Once verified, the email is taken.
    taken = rest(settings, "POST", "/v1/customers", {"email": email, "full_name": "Late"})
    assert taken.status == 409 and taken.reason == "EMAIL_TAKEN"


async def test_unverified_registrations_older_than_seven_days_are_removed(stack: Stack, settings: Settings) -> None:
    stale, fresh = register(settings), register(settings)
    old_but_verified = onboard(settings)
    aged = datetime.now(UTC) - UNVERIFIED_TTL - timedelta(hours=1)
    for customer_id in (stale["customer_id"], old_but_verified.customer_id):
        _sql(settings, "UPDATE customer.customers SET create_time = %s WHERE customer_id = %s", aged, customer_id)
    # The sweep svc_customer runs every hour (and at start), called here at once.
    async with await psycopg.AsyncConnection.connect(settings.pg_conninfo, autocommit=True,
                                                      options="-c search_path=customer") as conn:
        removed = await store.Tx(conn).delete_stale_registrations(datetime.now(UTC) - UNVERIFIED_TTL, 10_000)
    assert removed >= 1
    left = {row[0] for row in _sql(settings, "SELECT customer_id::text FROM customer.customers WHERE customer_id"
                                             " = ANY(%s::uuid[])",
                                   [stale["customer_id"], fresh["customer_id"], old_but_verified.customer_id])}
    assert left == {fresh["customer_id"], old_but_verified.customer_id}


# --- ResendVerificationCode ----------------------------------------------------------------

def test_a_resent_code_verifies_and_every_earlier_code_stops_working(stack: Stack, settings: Settings) -> None:
    customer = register(settings)
    first = wait_for_code(settings, customer["email"])
    resent = _resend(settings, customer["email"].upper())  # addresses are case-insensitive
    assert resent.status == 200 and resent.body == {}, resent.body
    second = wait_for_code(settings, customer["email"], count=2)
    if first != second:
        old = _verify(settings, customer["customer_id"], first)
        assert old.status == 400 and old.reason == "INVALID_CODE", old.body
    assert _verify(settings, customer["customer_id"], second).status == 200


def test_five_wrong_codes_void_the_code_and_the_owner_recovers(stack: Stack, settings: Settings) -> None:
    """Issue #13 point 3: TOO_MANY_ATTEMPTS used to make the address unusable for good."""
    customer = register(settings)
    code = wait_for_code(settings, customer["email"])
    for _ in range(5):
        assert _verify(settings, customer["customer_id"], _other_code(code)).reason == "INVALID_CODE"
    spent = _verify(settings, customer["customer_id"], code)
    assert spent.status == 429 and spent.reason == "TOO_MANY_ATTEMPTS", spent.body
    assert "resendVerificationCode" in spent.body["message"]  # the answer says how to recover
    # A new code: the count starts again, and it verifies.
    assert _resend(settings, customer["email"]).status == 200
    fresh = wait_for_code(settings, customer["email"], count=2)
    assert _verify(settings, customer["customer_id"], fresh).status == 200
    # The other way out, registering again, is test_an_unverified_email_is_not_taken_...


def test_resend_answers_alike_for_unknown_verified_and_unverified_addresses(stack: Stack, settings: Settings) -> None:
    unknown, verified, unverified = unique_email("nobody"), onboard(settings).email, register(settings)["email"]
    wait_for_code(settings, unverified)
    answers = [_resend(settings, email) for email in (unknown, verified, unverified)]
    assert [(a.status, a.body) for a in answers] == [(200, {})] * 3
    # Only the unverified customer gets a code; the others nothing (checked once it arrived).
    wait_for_code(settings, unverified, count=2)
    assert mail_count(settings, unknown) == 0
    assert _subjects(settings, verified) == ["Verify your email"]  # the one from its registration


def test_resends_are_limited_per_email_the_same_for_unknown_addresses(stack: Stack, settings: Settings) -> None:
    for email in (register(settings)["email"], unique_email("nobody")):
        for _ in range(CODE_REQUESTS_PER_EMAIL_MAX):
            assert _resend(settings, email).status == 200
        refused = _resend(settings, email)
        assert refused.status == 429 and refused.reason == "RATE_LIMITED", refused.body
        assert 3000 < _retry_delay_s(refused) <= 3600


async def _grpc_from(settings: Settings, address: str, call: str, request: Any) -> grpc.aio.AioRpcError | None:
    """A call on svc_customer's own port with the client address Envoy would have written."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.customer_grpc_port}") as channel:
        stub: Any = (auth_pb2_grpc.AuthServiceStub(channel) if call in ("RequestPasswordReset", "ResetPassword")
                     else customer_pb2_grpc.CustomerServiceStub(channel))
        try:
            await getattr(stub, call)(request, metadata=[(ratelimit.CLIENT_ADDRESS_HEADER, address)], timeout=10)
        except grpc.aio.AioRpcError as error:
            return error
    return None


@pytest.mark.parametrize(("call", "message"), [
    ("ResendVerificationCode", customer_pb2.ResendVerificationCodeRequest),
    ("RequestPasswordReset", auth_pb2.RequestPasswordResetRequest),
])
async def test_code_requests_are_limited_per_client_address(stack: Stack, settings: Settings, call: str,
                                                            message: Any) -> None:
    address = f"2001:db8:{uuid.uuid4().hex[:4]}:{uuid.uuid4().hex[:4]}::1"  # a fresh budget, whatever ran before
    answers = await asyncio.gather(*(_grpc_from(settings, address, call, message(email=unique_email("many")))
                                     for _ in range(CODE_REQUESTS_PER_ADDRESS_MAX)))
    assert answers == [None] * CODE_REQUESTS_PER_ADDRESS_MAX
    refused = await _grpc_from(settings, address, call, message(email=unique_email("many")))
    assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason_of(refused) == "RATE_LIMITED"
    status = status_of(refused)
    retry = retry_info(status) if status is not None else None
    assert retry is not None and 0 < retry.retry_delay.ToTimedelta().total_seconds() <= 900


# --- RequestPasswordReset / ResetPassword --------------------------------------------------

def _reset_code(settings: Settings, customer: Customer, count: int = 1) -> str:
    return wait_for_code(settings, customer.email, RESET, count, 30.0, customer.customer_id)


def test_a_password_reset_sets_the_password_and_ends_every_session(stack: Stack, settings: Settings) -> None:
    customer = onboard(settings)
    second = login(settings, customer.username, customer.password)
    requested = _request_reset(settings, customer.email)
    assert requested.status == 200 and requested.body == {}
    code = _reset_code(settings, customer)
    wrong = _reset(settings, customer.email, _other_code(code))
    assert wrong.status == 400 and wrong.reason == "INVALID_CODE", wrong.body
    # A weak password (here: containing the username) is refused and leaves the code usable.
    weak = _reset(settings, customer.email, code, f"{customer.username}-pass")
    assert weak.status == 400 and weak.reason == "WEAK_PASSWORD", weak.body
    done = _reset(settings, customer.email, code)
    assert done.status == 200 and done.body == {}, done.body
    # Every session's tokens stop working at once, on every service.
    for token in (customer.token, second["access_token"]):
        assert rest(settings, "GET", f"/v1/customers/{customer.customer_id}", token=token).status == 401
        assert rest(settings, "GET", "/v1/accounts", token=token).status == 401
    refreshed = rest(settings, "POST", "/v1/sessions:refresh", {"refresh_token": second["refresh_token"]})
    assert refreshed.status == 401
    old = rest(settings, "POST", "/v1/sessions", {"username": customer.username, "password": customer.password})
    assert old.status == 401 and old.reason == "BAD_CREDENTIALS"
    assert login(settings, customer.username, NEW_PASSWORD)["customer_id"] == customer.customer_id
    # Single use.
    again = _reset(settings, customer.email, code, "yet-another-passphrase")
    assert again.status == 400 and again.reason == "INVALID_CODE"
    _wait_for_subject(settings, customer.email, "Your password was changed")
    _assert_notified(settings, login(settings, customer.username, NEW_PASSWORD)["access_token"],
                     {"PASSWORD_RESET", "PASSWORD_CHANGED"})


def test_a_reset_ends_many_sessions_at_once(stack: Stack, settings: Settings) -> None:
    """All of them, however many (revoking them all side by side once emptied the Redis pool)."""
    customer = onboard(settings)
    sessions = [login(settings, customer.username, customer.password) for _ in range(24)]
    assert _request_reset(settings, customer.email).status == 200
    assert _reset(settings, customer.email, _reset_code(settings, customer)).status == 200
    refused = {rest(settings, "GET", "/v1/accounts", token=s["access_token"]).status for s in sessions}
    assert refused == {401}


def test_a_new_reset_request_voids_the_older_code(stack: Stack, settings: Settings) -> None:
    customer = onboard(settings)
    assert _request_reset(settings, customer.email).status == 200
    first = _reset_code(settings, customer)
    assert _request_reset(settings, customer.email).status == 200
    second = _reset_code(settings, customer, count=2)
    if first != second:
        voided = _reset(settings, customer.email, first)
        assert voided.status == 400 and voided.reason == "INVALID_CODE"
    assert _reset(settings, customer.email, second).status == 200


def test_five_wrong_reset_codes_void_it_for_known_and_unknown_addresses_alike(stack: Stack,
                                                                               settings: Settings) -> None:
    customer = onboard(settings)
    unknown = unique_email("nobody")
    for email in (customer.email, unknown):
        assert _request_reset(settings, email).status == 200
    code = _reset_code(settings, customer)
    for email in (customer.email, unknown):
        answers = [_reset(settings, email, _other_code(code)).reason for _ in range(5)]
        assert answers == ["INVALID_CODE"] * 5, (email, answers)
        spent = _reset(settings, email, code)
        assert spent.status == 429 and spent.reason == "TOO_MANY_ATTEMPTS", (email, spent.body)
    assert rest(settings, "POST", "/v1/sessions", {"username": customer.username,
                                                   "password": NEW_PASSWORD}).status == 401


def test_an_expired_reset_code_is_told_only_to_its_holder(stack: Stack, settings: Settings) -> None:
    customer = onboard(settings)
    assert _request_reset(settings, customer.email).status == 200
    code = _reset_code(settings, customer)
    _sql(settings, "UPDATE customer.password_resets SET expire_time = now() - interval '1 second' WHERE email = %s",
         customer.email)
    expired = _reset(settings, customer.email, code)
    assert expired.status == 400 and expired.reason == "CODE_EXPIRED", expired.body
    # A wrong code learns nothing about a reset having been asked for.
    assert _reset(settings, customer.email, _other_code(code)).reason == "INVALID_CODE"


def test_reset_requests_answer_alike_and_only_a_customer_with_a_login_gets_a_code(stack: Stack,
                                                                                   settings: Settings) -> None:
    customer = onboard(settings)
    unverified = register(settings)["email"]
    wait_for_code(settings, unverified)
    unknown = unique_email("nobody")
    answers = [_request_reset(settings, email) for email in (unknown, unverified, customer.email)]
    assert [(a.status, a.body) for a in answers] == [(200, {})] * 3
    _reset_code(settings, customer)
    assert mail_count(settings, unknown) == 0
    assert _subjects(settings, unverified) == ["Verify your email"]
    # The same limit for every address, known or not.
    for email in (customer.email, unknown):
        for _ in range(CODE_REQUESTS_PER_EMAIL_MAX - 1):
            assert _request_reset(settings, email).status == 200
        refused = _request_reset(settings, email)
        assert refused.status == 429 and refused.reason == "RATE_LIMITED", (email, refused.body)
        assert _retry_delay_s(refused) > 0
    # A reset for an address nobody asked about: the same INVALID_CODE as a wrong code.
    assert _reset(settings, unique_email("nobody"), "123456").reason == "INVALID_CODE"


# --- ChangePassword ------------------------------------------------------------------------

def test_change_password_keeps_the_calling_session_and_ends_the_others(stack: Stack, settings: Settings) -> None:
    customer = onboard(settings)
    other = login(settings, customer.username, customer.password)
    path = "/v1/credentials:changePassword"
    wrong = rest(settings, "POST", path, {"current_password": "not-the-password", "new_password": NEW_PASSWORD},
                 token=customer.token)
    assert wrong.status == 401 and wrong.reason == "BAD_CREDENTIALS", wrong.body
    weak = rest(settings, "POST", path, {"current_password": customer.password, "new_password": "password123"},
                token=customer.token)
    assert weak.status == 400 and weak.reason == "WEAK_PASSWORD", weak.body
    done = rest(settings, "POST", path, {"current_password": customer.password, "new_password": NEW_PASSWORD},
                token=customer.token)
    assert done.status == 200 and done.body == {}, done.body
    assert rest(settings, "GET", f"/v1/customers/{customer.customer_id}", token=customer.token).status == 200
    assert rest(settings, "GET", f"/v1/customers/{customer.customer_id}", token=other["access_token"]).status == 401
    assert rest(settings, "POST", "/v1/sessions", {"username": customer.username,
                                                   "password": STRONG_PASSWORD}).status == 401
    login(settings, customer.username, NEW_PASSWORD)
    _wait_for_subject(settings, customer.email, "Your password was changed")


def test_wrong_current_passwords_count_as_failed_logins(stack: Stack, settings: Settings) -> None:
    customer = onboard(settings)
    for _ in range(settings.login_failures_per_username_max):
        wrong = rest(settings, "POST", "/v1/credentials:changePassword",
                     {"current_password": "not-the-password", "new_password": NEW_PASSWORD}, token=customer.token)
        assert wrong.status == 401 and wrong.reason == "BAD_CREDENTIALS", wrong.body
    # The username's limit is spent: the right password waits, for a login as for a change.
    for path, body in (("/v1/sessions", {"username": customer.username, "password": customer.password}),
                       ("/v1/credentials:changePassword", {"current_password": customer.password,
                                                           "new_password": NEW_PASSWORD})):
        refused = rest(settings, "POST", path, body, token=customer.token)
        assert refused.status == 429 and refused.reason == "RATE_LIMITED", (path, refused.body)


# --- UpdateCustomer ------------------------------------------------------------------------

def test_update_customer_changes_only_the_fields_in_the_mask(stack: Stack, settings: Settings) -> None:
    customer = onboard(settings)
    path = f"/v1/customers/{customer.customer_id}"
    renamed = rest(settings, "PATCH", path, {"customer": {"full_name": "  Grace   Hopper ", "phone_number": "+14155550100"},
                                             "update_mask": "full_name"}, token=customer.token)
    assert renamed.status == 200 and renamed.body["full_name"] == "Grace Hopper", renamed.body
    assert renamed.body["email"] == customer.email and renamed.body["email_verified"] is True

    def phone() -> Any:
        return _sql(settings, "SELECT phone_number FROM customer.customers WHERE customer_id = %s",
                    customer.customer_id)[0][0]

    assert phone() is None  # not in the mask: unchanged
    # JSON field masks are camelCase by the proto3 JSON mapping; snake_case works too.
    for mask in ("phoneNumber", "phone_number"):
        assert rest(settings, "PATCH", path, {"customer": {"phone_number": "+14155550100"}, "update_mask": mask},
                    token=customer.token).status == 200
        assert phone() == "+14155550100"
        assert rest(settings, "PATCH", path, {"customer": {}, "update_mask": mask}, token=customer.token).status == 200
        assert phone() is None  # named with no value: removed
    assert rest(settings, "GET", path, token=customer.token).body["full_name"] == "Grace Hopper"
    for mask in ("email", "customer_id", "email_verified", "create_time", "nickname", "full_name,email", ""):
        refused = rest(settings, "PATCH", path, {"customer": {"full_name": "X", "email": "x@example.com"},
                                                 "update_mask": mask}, token=customer.token)
        assert refused.status == 400 and refused.reason == "INVALID_ARGUMENT", (mask, refused.body)
    for bad in ({"full_name": ""}, {"full_name": "x" * 101}):
        refused = rest(settings, "PATCH", path, {"customer": bad, "update_mask": "full_name"}, token=customer.token)
        assert refused.status == 400, refused.body
    assert rest(settings, "GET", path, token=customer.token).body["email"] == customer.email


# --- ChangeEmail / ConfirmEmailChange ------------------------------------------------------

def _change_email(settings: Settings, customer: Customer, new_email: str) -> Response:
    return rest(settings, "POST", f"/v1/customers/{customer.customer_id}:changeEmail", {"new_email": new_email},
                token=customer.token)


def _confirm(settings: Settings, customer: Customer, code: str) -> Response:
    return rest(settings, "POST", f"/v1/customers/{customer.customer_id}:confirmEmailChange", {"code": code},
                token=customer.token)


def test_an_email_change_takes_effect_once_confirmed_and_the_old_address_is_told(stack: Stack,
                                                                                  settings: Settings) -> None:
    customer = onboard(settings)
    new_email = unique_email("moved")
    nothing = _confirm(settings, customer, "123456")
    assert nothing.status == 400 and nothing.reason == "NO_EMAIL_CHANGE", nothing.body
    asked = _change_email(settings, customer, new_email)
    assert asked.status == 200 and asked.body["email"] == customer.email, asked.body
    code = wait_for_code(settings, new_email, "Verification code", 1, 30.0, customer.customer_id)
    # Until confirmed, the email is the old one.
    assert rest(settings, "GET", f"/v1/customers/{customer.customer_id}", token=customer.token).body["email"] == \
        customer.email
    wrong = _confirm(settings, customer, _other_code(code))
    assert wrong.status == 400 and wrong.reason == "INVALID_CODE", wrong.body
    confirmed = _confirm(settings, customer, code)
    assert confirmed.status == 200 and confirmed.body["email"] == new_email, confirmed.body
    assert rest(settings, "GET", f"/v1/customers/{customer.customer_id}", token=customer.token).body["email"] == new_email
    _wait_for_subject(settings, customer.email, "Your email address was changed")
    _assert_notified(settings, customer.token, {"EMAIL_VERIFICATION", "EMAIL_CHANGED"})
    # Every later email goes to the new address: a movement's email...
    teller = login(settings, settings.teller_username, settings.teller_password)["access_token"]
    account = rest(settings, "POST", "/v1/accounts", {"currency": "USD"}, token=customer.token).body["account_id"]
    deposited = rest(settings, "POST", "/v1/deposits", {"request_id": uuid.uuid4().hex, "account_id": account,
                                                        "amount": "500", "currency": "USD"}, token=teller)
    assert deposited.status == 200, deposited.body
    _wait_for_subject(settings, new_email, "Deposit of 5.00 USD")
    assert "Deposit of 5.00 USD" not in _subjects(settings, customer.email)
    # ...and a reset: one asked for the old address sends nothing.
    assert _request_reset(settings, customer.email).status == 200
    assert _request_reset(settings, new_email).status == 200
    wait_for_code(settings, new_email, RESET, 1, 30.0, customer.customer_id)
    assert RESET not in " ".join(_subjects(settings, customer.email))
    assert "Reset your password" not in _subjects(settings, customer.email)


def test_an_address_another_customer_verified_is_taken_an_unverified_one_is_not(stack: Stack,
                                                                                settings: Settings) -> None:
    customer, other = onboard(settings), onboard(settings)
    taken = _change_email(settings, customer, other.email)
    assert taken.status == 409 and taken.reason == "EMAIL_TAKEN", taken.body
    same = _change_email(settings, customer, customer.email)
    assert same.status == 400, same.body
    squatted = register(settings)
    wait_for_code(settings, squatted["email"])  # its own code first: the next one is the change's
    assert _change_email(settings, customer, squatted["email"]).status == 200
    code = wait_for_code(settings, squatted["email"], "Verification code", 2, 30.0, customer.customer_id)
    assert _confirm(settings, customer, code).status == 200
    # The unverified registration of that address was discarded.
    assert _sql(settings, "SELECT 1 FROM customer.customers WHERE customer_id = %s", squatted["customer_id"]) == []


def test_email_change_codes_follow_the_verification_rules(stack: Stack, settings: Settings) -> None:
    customer = onboard(settings)
    new_email = unique_email("moved")
    assert _change_email(settings, customer, new_email).status == 200
    code = wait_for_code(settings, new_email, "Verification code", 1, 30.0, customer.customer_id)
    for _ in range(5):
        assert _confirm(settings, customer, _other_code(code)).reason == "INVALID_CODE"
    spent = _confirm(settings, customer, code)
    assert spent.status == 429 and spent.reason == "TOO_MANY_ATTEMPTS", spent.body
    # A new request starts over; an expired code is CODE_EXPIRED.
    assert _change_email(settings, customer, new_email).status == 200
    code = wait_for_code(settings, new_email, "Verification code", 2, 30.0, customer.customer_id)
    _sql(settings, "UPDATE customer.email_changes SET expire_time = now() - interval '1 second'"
                   " WHERE customer_id = %s", customer.customer_id)
    expired = _confirm(settings, customer, code)
    assert expired.status == 400 and expired.reason == "CODE_EXPIRED", expired.body
    # At most 3 requests per customer per hour.
    assert _change_email(settings, customer, unique_email("moved")).status == 200
    limited = _change_email(settings, customer, unique_email("moved"))
    assert limited.status == 429 and limited.reason == "RATE_LIMITED", limited.body

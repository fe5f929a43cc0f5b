"""Customers, credentials, sessions and accounts, end to end through Envoy by REST, with the
verification email read from Mailpit: the journey, every error reason, token tampering,
expiry and revocation, the duplicate-email race, and other customers' objects being invisible."""

from __future__ import annotations

import base64
import dataclasses
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from argon2 import PasswordHasher
from pyseto import Key

from common import auth, db
from common.config import Settings
from common.errors import DomainError
from devstack.stack import Stack
from svc_customer import service as customer_service
from svc_customer.service import Passwords
from svc_customer.store import CustomerStore
from tests.support import (
    STRONG_PASSWORD,
    login,
    onboard,
    register,
    rest,
    unique_email,
    verify,
    wait_for_verification_code,
)
from tests.tokens import test_tokens


def test_the_whole_journey_by_rest(stack: Stack, settings: Settings) -> None:
    email = unique_email("journey")
    registered = rest(settings, "POST", "/v1/customers",
                      {"email": email.upper(), "full_name": "  Ada   Lovelace ", "phone_number": "+14155550123"})
    assert registered.status == 200, registered.body
    customer = registered.body
    assert customer["email"] == email  # normalised to lower case
    assert customer["full_name"] == "Ada Lovelace"
    assert customer["email_verified"] is False
    assert set(customer) == {"customer_id", "email", "full_name", "email_verified", "create_time"}

    code = wait_for_verification_code(settings, email)
    verified = rest(settings, "POST", f"/v1/customers/{customer['customer_id']}:verifyEmail", {"code": code})
    assert verified.status == 200, verified.body
    assert verified.body["customer"]["email_verified"] is True
    enrollment_token = verified.body["enrollment_token"]

    username = f"ada{uuid.uuid4().hex[:8]}"
    credential = rest(settings, "POST", "/v1/credentials",
                      {"enrollment_token": enrollment_token, "username": username, "password": STRONG_PASSWORD})
    assert credential.status == 200, credential.body
    assert credential.body == {"customer_id": customer["customer_id"], "username": username}
    with psycopg.connect(settings.pg_conninfo) as conn:
        row = conn.execute("SELECT password_hash FROM customer.credentials WHERE username = %s", (username,)).fetchone()
    # argon2id with OWASP's parameters: 19 MiB, 2 iterations, parallelism 1; never the password itself.
    assert row is not None and row[0].startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert STRONG_PASSWORD not in row[0]
    # The enrollment token was single-use.
    again = rest(settings, "POST", "/v1/credentials",
                 {"enrollment_token": enrollment_token, "username": username + "x", "password": STRONG_PASSWORD})
    assert again.status == 401 and again.reason == "INVALID_ENROLLMENT_TOKEN"

    session = login(settings, username, STRONG_PASSWORD)
    assert session["customer_id"] == customer["customer_id"]
    assert session["access_token"].startswith("v4.public.")
    token = session["access_token"]

    me = rest(settings, "GET", f"/v1/customers/{customer['customer_id']}", token=token)
    assert me.status == 200 and me.body["email_verified"] is True

    usd = rest(settings, "POST", "/v1/accounts", {"currency": "usd"}, token=token)
    assert usd.status == 200, usd.body
    assert usd.body["balance"] == "0" and usd.body["status"] == "ACTIVE" and usd.body["currency"] == "USD"
    assert usd.body["customer_id"] == customer["customer_id"]
    eur = rest(settings, "POST", "/v1/accounts", {"currency": "EUR"}, token=token)
    assert eur.status == 200, eur.body
    got = rest(settings, "GET", f"/v1/accounts/{usd.body['account_id']}", token=token)
    assert got.status == 200 and got.body["balance"] == "0"
    listed = rest(settings, "GET", "/v1/accounts", token=token)
    assert listed.status == 200
    assert [a["account_id"] for a in listed.body["accounts"]] == [eur.body["account_id"], usd.body["account_id"]]
    assert listed.body["next_page_token"] == ""

    refreshed = rest(settings, "POST", "/v1/sessions:refresh", {"refresh_token": session["refresh_token"]})
    assert refreshed.status == 200, refreshed.body
    assert refreshed.body["session_id"] == session["session_id"]
    assert refreshed.body["refresh_token"] != session["refresh_token"]
    new_token = refreshed.body["access_token"]
    assert rest(settings, "GET", "/v1/accounts", token=new_token).status == 200

    logout = rest(settings, "DELETE", f"/v1/sessions/{session['session_id']}", token=new_token)
    assert logout.status == 200, logout.body
    # Every token of the session stops working at once, in every service.
    for path in ("/v1/accounts", f"/v1/customers/{customer['customer_id']}", "/v1/notifications"):
        refused = rest(settings, "GET", path, token=new_token)
        assert refused.status == 401 and refused.reason == "SESSION_REVOKED", (path, refused.body)
    assert rest(settings, "POST", "/v1/sessions:refresh",
                {"refresh_token": refreshed.body["refresh_token"]}).reason == "SESSION_REVOKED"


def test_twenty_racing_registrations_of_one_email_make_one_customer(stack: Stack, settings: Settings) -> None:
    """An unverified email is not taken (API.md v1 additions): racing registrations each discard
    the one before, in turn, and one customer is left, one of those answered."""
    email = unique_email("race")
    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(
            lambda i: rest(settings, "POST", "/v1/customers", {"email": email, "full_name": f"Racer {i}"}), range(20)))
    assert sorted(r.status for r in responses) == [200] * 20, [r.body for r in responses if r.status != 200]
    with psycopg.connect(settings.pg_conninfo) as conn:
        rows = conn.execute("SELECT customer_id::text FROM customer.customers WHERE email = %s", (email,)).fetchall()
    assert len(rows) == 1 and rows[0][0] in {r.body["customer_id"] for r in responses}


def test_registration_errors(stack: Stack, settings: Settings) -> None:
    # Only a verified email is taken (an unverified one: tests/test_recovery.py).
    email = onboard(settings).email
    taken = rest(settings, "POST", "/v1/customers", {"email": email.upper(), "full_name": "B"})
    assert taken.status == 409 and taken.reason == "EMAIL_TAKEN"
    for body, field in [({"email": "not-an-email", "full_name": "A"}, "email"),
                        ({"email": unique_email(), "full_name": ""}, "full_name"),
                        ({"email": unique_email(), "full_name": "x" * 101}, "full_name"),
                        ({"email": unique_email(), "full_name": "A", "phone_number": "555-1234"}, "phone_number")]:
        bad = rest(settings, "POST", "/v1/customers", body)
        assert bad.status == 400, body
        violations = [d for d in bad.body["details"] if d["@type"].endswith("BadRequest")]
        assert violations and violations[0]["field_violations"][0]["field"] == field


def test_verification_errors(stack: Stack, settings: Settings) -> None:
    customer = register(settings)
    path = f"/v1/customers/{customer['customer_id']}:verifyEmail"
    code = wait_for_verification_code(settings, customer["email"])
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    first = rest(settings, "POST", path, {"code": wrong})
    assert first.status == 400 and first.reason == "INVALID_CODE"
    for _ in range(4):
        assert rest(settings, "POST", path, {"code": wrong}).reason == "INVALID_CODE"
    # Five wrong tries: even the right code is refused now.
    blocked = rest(settings, "POST", path, {"code": code})
    assert blocked.status == 429 and blocked.reason == "TOO_MANY_ATTEMPTS"

    expired = register(settings)
    expired_code = wait_for_verification_code(settings, expired["email"])
    with psycopg.connect(settings.pg_conninfo) as conn:
        conn.execute("UPDATE customer.verification_codes SET expire_time = now() - interval '1 second'"
                     " WHERE customer_id = %s", (expired["customer_id"],))
    late = rest(settings, "POST", f"/v1/customers/{expired['customer_id']}:verifyEmail", {"code": expired_code})
    assert late.status == 400 and late.reason == "CODE_EXPIRED"

    unknown = rest(settings, "POST", f"/v1/customers/{uuid.uuid4()}:verifyEmail", {"code": "123456"})
    assert unknown.status == 404


def test_credential_errors(stack: Stack, settings: Settings) -> None:
    first = onboard(settings)
    other = register(settings)
    token = verify(settings, other)
    taken = rest(settings, "POST", "/v1/credentials",
                 {"enrollment_token": token, "username": first.username, "password": STRONG_PASSWORD})
    assert taken.status == 409 and taken.reason == "USERNAME_TAKEN"
    username = f"u{uuid.uuid4().hex[:10]}"
    for weak in ["short", "password123", "aaaaaaaaaaaa", f"my-{username}-pw", "x" * 129]:
        response = rest(settings, "POST", "/v1/credentials",
                        {"enrollment_token": token, "username": username, "password": weak})
        assert response.status == 400 and response.reason == "WEAK_PASSWORD", weak
    bad_token = rest(settings, "POST", "/v1/credentials",
                     {"enrollment_token": "forged", "username": username, "password": STRONG_PASSWORD})
    assert bad_token.status == 401 and bad_token.reason == "INVALID_ENROLLMENT_TOKEN"
    # The weak tries did not spend the token.
    ok = rest(settings, "POST", "/v1/credentials",
              {"enrollment_token": token, "username": username, "password": STRONG_PASSWORD})
    assert ok.status == 200, ok.body


def test_login_fails_the_same_way_for_unknown_user_and_wrong_password(stack: Stack, settings: Settings) -> None:
    customer = onboard(settings)
    timings: dict[str, list[float]] = {"unknown": [], "wrong": []}
    for _ in range(5):
        for kind, username in (("unknown", f"nobody{uuid.uuid4().hex[:8]}"), ("wrong", customer.username)):
            started = time.perf_counter()
            response = rest(settings, "POST", "/v1/sessions", {"username": username, "password": "not-the-password"})
            timings[kind].append(time.perf_counter() - started)
            assert response.status == 401 and response.reason == "BAD_CREDENTIALS"
            assert response.body["message"] == "wrong username or password"
    # Both paths verify an argon2id hash; neither is an order of magnitude cheaper.
    unknown, wrong = sorted(timings["unknown"])[2], sorted(timings["wrong"])[2]
    assert unknown > wrong / 5 and wrong > unknown / 5, timings


def test_refresh_token_reuse_revokes_the_session(stack: Stack, settings: Settings) -> None:
    customer = onboard(settings)
    first_refresh = customer.session["refresh_token"]
    rotated = rest(settings, "POST", "/v1/sessions:refresh", {"refresh_token": first_refresh})
    assert rotated.status == 200
    replay = rest(settings, "POST", "/v1/sessions:refresh", {"refresh_token": first_refresh})
    assert replay.status == 401 and replay.reason == "SESSION_REVOKED"
    # The thief's replay revoked the whole session: the legitimate new tokens are dead too.
    assert rest(settings, "POST", "/v1/sessions:refresh",
                {"refresh_token": rotated.body["refresh_token"]}).reason == "SESSION_REVOKED"
    assert rest(settings, "GET", "/v1/accounts", token=rotated.body["access_token"]).reason == "SESSION_REVOKED"
    assert rest(settings, "POST", "/v1/sessions:refresh", {"refresh_token": "garbage"}).reason == "INVALID_REFRESH_TOKEN"


def test_tampered_expired_foreign_and_missing_tokens_are_refused(stack: Stack, settings: Settings) -> None:
    customer = onboard(settings)
    token = customer.token
    assert rest(settings, "GET", "/v1/accounts", token=token).status == 200

    missing = rest(settings, "GET", "/v1/accounts")
    assert missing.status == 401 and missing.reason == "UNAUTHENTICATED"

    # Flip one character of the signed payload.
    prefix, body = token[: len("v4.public.")], token[len("v4.public."):]
    flipped = body[:10] + ("A" if body[10] != "A" else "B") + body[11:]
    tampered = rest(settings, "GET", "/v1/accounts", token=prefix + flipped)
    assert tampered.status == 401 and tampered.reason == "INVALID_TOKEN"

    # A token signed by a key the bank does not trust, claiming the same key id.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    rogue_pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    rogue = auth.TokenIssuer(dataclasses.replace(auth.load_keys(settings, signing=True),
                                                 signing_key=Key.new(4, "public", rogue_pem)), 900)
    forged = rogue.issue(customer.customer_id, auth.Role.TELLER, customer.session["session_id"]).token
    refused = rest(settings, "GET", "/v1/accounts", token=forged)
    assert refused.status == 401 and refused.reason == "INVALID_TOKEN"

    # An expired token (a real one, with a one-second lifetime).
    short = test_tokens(dataclasses.replace(settings, access_token_ttl_s=1)).customer(customer.customer_id)
    time.sleep(2.1)
    expired = rest(settings, "GET", "/v1/accounts", token=short)
    assert expired.status == 401 and expired.reason == "TOKEN_EXPIRED"

    # Not a PASETO at all, and a local (symmetric) token.
    for junk in ["abc", "v4.local." + base64.urlsafe_b64encode(b"x" * 40).decode()]:
        assert rest(settings, "GET", "/v1/accounts", token=junk).reason == "INVALID_TOKEN"


def test_account_rules(stack: Stack, settings: Settings) -> None:
    customer = onboard(settings)
    unsupported = rest(settings, "POST", "/v1/accounts", {"currency": "XYZ"}, token=customer.token)
    assert unsupported.status == 400 and unsupported.reason == "UNSUPPORTED_CURRENCY"

    # A customer whose email is not verified cannot open accounts (the public flow cannot even
    # give such a customer a session: the token here is minted with the bank's own key).
    unverified = register(settings)
    token = test_tokens(settings).customer(unverified["customer_id"])
    refused = rest(settings, "POST", "/v1/accounts", {"currency": "USD"}, token=token)
    assert refused.status == 400 and refused.reason == "EMAIL_NOT_VERIFIED"

    account = rest(settings, "POST", "/v1/accounts", {"currency": "GBP"}, token=customer.token).body
    teller = login(settings, settings.teller_username, settings.teller_password)
    assert teller["customer_id"] == ""
    # Freezing is the teller's.
    denied = rest(settings, "POST", f"/v1/accounts/{account['account_id']}:freeze", {"reason": "mine"},
                  token=customer.token)
    assert denied.status == 403 and denied.reason == "TELLER_ONLY"
    frozen = rest(settings, "POST", f"/v1/accounts/{account['account_id']}:freeze", {"reason": "fraud check"},
                  token=teller["access_token"])
    assert frozen.status == 200 and frozen.body["status"] == "FROZEN"
    assert rest(settings, "GET", f"/v1/accounts/{account['account_id']}", token=customer.token).body["status"] == "FROZEN"
    # The status lives in the ledger: a frozen account takes no movement.
    deposit = {"request_id": uuid.uuid4().hex, "account_id": account["account_id"], "amount": "100", "currency": "GBP"}
    refused = rest(settings, "POST", "/v1/deposits", deposit, token=teller["access_token"])
    assert refused.status == 400 and refused.reason == "ACCOUNT_INACTIVE", refused.body
    thawed = rest(settings, "POST", f"/v1/accounts/{account['account_id']}:unfreeze", {"reason": "cleared"},
                  token=teller["access_token"])
    assert thawed.status == 200 and thawed.body["status"] == "ACTIVE"

    closed = rest(settings, "POST", f"/v1/accounts/{account['account_id']}:close", {}, token=customer.token)
    assert closed.status == 200 and closed.body["status"] == "CLOSED"
    deposit["request_id"] = uuid.uuid4().hex
    refused = rest(settings, "POST", "/v1/deposits", deposit, token=teller["access_token"])
    assert refused.status == 400 and refused.reason == "ACCOUNT_INACTIVE", refused.body


def test_closing_an_account_with_money_is_refused(stack: Stack, settings: Settings) -> None:
    customer = onboard(settings)
    account = rest(settings, "POST", "/v1/accounts", {"currency": "USD"}, token=customer.token).body
    teller = login(settings, settings.teller_username, settings.teller_password)
    deposit = rest(settings, "POST", "/v1/deposits",
                   {"request_id": uuid.uuid4().hex, "account_id": account["account_id"], "amount": "500",
                    "currency": "USD"}, token=teller["access_token"])
    if deposit.status == 501:
        pytest.skip("CreateDeposit is not built yet")
    assert deposit.status == 200, deposit.body
    refused = rest(settings, "POST", f"/v1/accounts/{account['account_id']}:close", {}, token=customer.token)
    assert refused.status == 400 and refused.reason == "ACCOUNT_NOT_EMPTY"
    assert rest(settings, "GET", f"/v1/accounts/{account['account_id']}", token=customer.token).body["balance"] == "500"


def test_other_customers_objects_are_invisible(stack: Stack, settings: Settings) -> None:
    alice, bob = onboard(settings), onboard(settings)
    account = rest(settings, "POST", "/v1/accounts", {"currency": "USD"}, token=alice.token).body
    cases: list[tuple[str, str, dict[str, str] | None]] = [
        ("GET", f"/v1/customers/{alice.customer_id}", None),
        ("GET", f"/v1/accounts/{account['account_id']}", None),
        ("POST", f"/v1/accounts/{account['account_id']}:close", {}),
        ("DELETE", f"/v1/sessions/{alice.session['session_id']}", None),
    ]
    for method, path, body in cases:
        response = rest(settings, method, path, body, token=bob.token)
        assert response.status == 404, (method, path, response.body)
    # ...and they were not touched.
    assert rest(settings, "GET", f"/v1/accounts/{account['account_id']}", token=alice.token).body["status"] == "ACTIVE"
    assert rest(settings, "GET", "/v1/accounts", token=alice.token).status == 200
    assert [a["account_id"] for a in rest(settings, "GET", "/v1/accounts", token=bob.token).body["accounts"]] == []


def test_accounts_are_paginated(stack: Stack, settings: Settings) -> None:
    customer = onboard(settings)
    opened = [rest(settings, "POST", "/v1/accounts", {"currency": c}, token=customer.token).body["account_id"]
              for c in ("USD", "EUR", "GBP", "JPY", "USD")]
    seen: list[str] = []
    token = ""
    for _ in range(5):
        page = rest(settings, "GET", f"/v1/accounts?page_size=2&page_token={token}", token=customer.token).body
        seen += [a["account_id"] for a in page["accounts"]]
        token = page["next_page_token"]
        if not token:
            break
    assert seen == list(reversed(opened))
    bad = rest(settings, "GET", "/v1/accounts?page_token=garbage", token=customer.token)
    assert bad.status == 400 and bad.reason == "INVALID_PAGE_TOKEN"
    assert rest(settings, "GET", "/v1/accounts?page_size=-1", token=customer.token).status == 400


async def test_only_a_live_enrollment_token_buys_a_password_hash(stack: Stack, settings: Settings) -> None:
    """CreateCredential needs no login, and an argon2id hash costs ~20 ms of a core and 19 MiB:
    a made-up, used or expired token is refused before hashing, so it cannot buy CPU. (A spy
    counts the hashes of the use case, called as svc_customer calls it, on the real store.)"""
    pool = await db.open_pool(settings, "customer")
    try:
        customers = CustomerStore(pool)
        hashed: list[str] = []

        class CountingHasher(PasswordHasher):
            def hash(self, password: str | bytes, *, salt: bytes | None = None) -> str:
                hashed.append(str(password))
                return super().hash(password, salt=salt)

        real = customer_service.HASHER
        passwords = Passwords(hasher=CountingHasher(real.time_cost, real.memory_cost, real.parallelism,
                                                    real.hash_len, real.salt_len))
        hashed.clear()  # the hash made at start, to verify against for unknown usernames
        for token in ["made-up", "x" * 200]:
            with pytest.raises(DomainError) as refused:
                await customer_service.create_credential(customers, passwords, token,
                                                         f"u{uuid.uuid4().hex[:12]}", STRONG_PASSWORD)
            assert refused.value.reason == "INVALID_ENROLLMENT_TOKEN"
        assert hashed == []
        live = verify(settings, register(settings))
        await customer_service.create_credential(customers, passwords, live, f"u{uuid.uuid4().hex[:12]}",
                                                 STRONG_PASSWORD)
        assert hashed == [STRONG_PASSWORD]
        with pytest.raises(DomainError) as spent:  # used now: refused before a second hash
            await customer_service.create_credential(customers, passwords, live, f"u{uuid.uuid4().hex[:12]}",
                                                     STRONG_PASSWORD)
        assert spent.value.reason == "INVALID_ENROLLMENT_TOKEN" and hashed == [STRONG_PASSWORD]
    finally:
        await pool.close()

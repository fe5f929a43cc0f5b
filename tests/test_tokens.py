"""Access tokens and sessions (OWASP API Security Top 10 2023, API2 broken authentication),
against the running stack through Envoy: every kind of forged, altered or outdated token is
refused by every service; key rotation keeps old tokens working until their key is retired,
and a retired key's tokens stop working everywhere; a customer lists their sessions (never
their tokens) and ends any of them. (Refresh-token reuse revoking the session, and logout
cutting every token off at once, are in tests/test_customers.py.)"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyseto
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pyseto import Key
from pyseto.key_interface import KeyInterface

from common import auth
from common.config import Settings
from devstack.stack import Stack
from tests.support import Customer, Response, kill9, login, onboard, rest, until

PREFIX = "v4.public."


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _kid(token: str) -> str:
    return str(json.loads(_b64decode(token.split(".")[3]))["kid"])


def _paths(customer: Customer) -> dict[str, str]:
    """One authenticated read per service; each answers 401 for a bad token, else 200 or 404."""
    return {"svc_customer": f"/v1/customers/{customer.customer_id}", "svc_account": "/v1/accounts",
            "svc_transfer": f"/v1/transfers/{uuid.uuid4()}", "svc_notify": "/v1/notifications"}


def _answers(settings: Settings, customer: Customer, token: str) -> dict[str, Response]:
    return {service: rest(settings, "GET", path, token=token) for service, path in _paths(customer).items()}


def _accepted(settings: Settings, customer: Customer, token: str) -> bool:
    answers = _answers(settings, customer, token)
    assert all(a.status in (200, 404, 401) for a in answers.values()), answers
    return all(a.status != 401 for a in answers.values())


def _refused_everywhere(settings: Settings, customer: Customer, token: str, reason: str) -> None:
    for service, answer in _answers(settings, customer, token).items():
        assert answer.status == 401 and answer.reason == reason, (service, answer.body)


@pytest.fixture(scope="module")
def customer(stack: Stack, settings: Settings) -> Customer:
    return onboard(settings)


# --- forged and altered tokens -------------------------------------------------------------

def _claims(customer: Customer, **changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {"sub": customer.customer_id, "role": "customer", "sid": customer.session["session_id"],
                              "jti": uuid.uuid4().hex, "iat": datetime.now(UTC).isoformat()}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def _sign(key: KeyInterface, claims: dict[str, Any], footer: dict[str, str] | None, exp_s: int = 600) -> str:
    token = pyseto.encode(key, claims, footer=footer if footer is not None else b"", serializer=json, exp=exp_s)
    return token.decode()


def _flip_bit(token: str, index_from_end: int | None = None, index: int = 20) -> str:
    """One bit flipped in the signed body: in the message (index) or the signature (from the end)."""
    parts = token.split(".")
    body = bytearray(_b64decode(parts[2]))
    position = len(body) - index_from_end if index_from_end is not None else index
    body[position] ^= 0x01
    parts[2] = _b64encode(bytes(body))
    return ".".join(parts)


def _private_pem(settings: Settings) -> bytes:
    folder = Path(settings.key_dir)
    return (folder / f"{auth.signing_key_name(folder)}{auth.PRIVATE_SUFFIX}").read_bytes()


def _new_pair() -> tuple[bytes, bytes]:
    """A fresh Ed25519 key pair (private PEM, public PEM) the bank has never seen."""
    key = Ed25519PrivateKey.generate()
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
            key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def _forgeries(settings: Settings, customer: Customer) -> dict[str, tuple[str, str]]:
    """Name -> (token, the reason it is refused with)."""
    ring = auth.load_keys(settings, signing=True)
    assert ring.signing_key is not None
    real, kid = ring.signing_key, ring.signing_kid
    good = _sign(real, _claims(customer), {"kid": kid})
    rogue_private, rogue_public = _new_pair()
    rogue, rogue_kid = Key.new(4, "public", rogue_private), Key.new(4, "public", rogue_public).to_paserk_id()
    p384 = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    past = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    invalid = "INVALID_TOKEN"
    return {
        "a bit flipped in the payload": (_flip_bit(good, index=12), invalid),
        "a bit flipped in the signature": (_flip_bit(good, index_from_end=3), invalid),
        "signed by a foreign key under our key id": (_sign(rogue, _claims(customer, role="teller"), {"kid": kid}), invalid),
        "signed by a foreign key under its own key id": (
            _sign(rogue, _claims(customer), {"kid": rogue_kid}), invalid),
        "an unknown key id": (_sign(real, _claims(customer), {"kid": "k4.pid." + _b64encode(b"\0" * 33)}), invalid),
        "no footer": (_sign(real, _claims(customer), None), invalid),
        "a footer that is not JSON": (good.rsplit(".", 1)[0] + "." + _b64encode(b"kid"), invalid),
        "the footer of another token": (good.rsplit(".", 1)[0] + "." + _b64encode(b'{"kid": "other"}'), invalid),
        "purpose local (symmetric)": (
            _sign(Key.new(4, "local", b"k" * 32), _claims(customer), {"kid": kid}), invalid),
        "version 2, our own private key": (_sign(Key.new(2, "public", _private_pem(settings)), _claims(customer),
                                                 {"kid": kid}), invalid),
        "version 3": (_sign(Key.new(3, "public", p384), _claims(customer), {"kid": kid}), invalid),
        "role service": (_sign(real, _claims(customer, role="service"), {"kid": kid}), invalid),
        "an unknown role": (_sign(real, _claims(customer, role="admin"), {"kid": kid}), invalid),
        "no session id": (_sign(real, _claims(customer, sid=None), {"kid": kid}), invalid),
        "expired": (pyseto.encode(real, _claims(customer, exp=past), footer={"kid": kid}, serializer=json).decode(),
                    "TOKEN_EXPIRED"),
        "too long": (good + "A" * auth.TOKEN_LENGTH_MAX, invalid),
        "not a token": ("not-a-token", invalid),
    }


def test_a_token_made_the_same_way_but_untouched_is_accepted(settings: Settings, customer: Customer) -> None:
    """The control for the forgeries below: built by the same code, only not altered."""
    ring = auth.load_keys(settings, signing=True)
    assert ring.signing_key is not None
    assert _accepted(settings, customer, _sign(ring.signing_key, _claims(customer), {"kid": ring.signing_kid}))


def test_forged_or_altered_tokens_are_refused_by_every_service(settings: Settings, customer: Customer) -> None:
    for forgery, (token, reason) in _forgeries(settings, customer).items():
        answers = _answers(settings, customer, token)
        for service, answer in answers.items():
            assert answer.status == 401 and answer.reason == reason, (forgery, service, answer.body)


@pytest.mark.parametrize("authorization", ["", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "v4.public.x"])
def test_a_malformed_authorization_header_is_refused(settings: Settings, customer: Customer, authorization: str) -> None:
    answer = rest(settings, "GET", "/v1/accounts", headers={"Authorization": authorization} if authorization else None)
    assert answer.status == 401 and answer.reason in ("UNAUTHENTICATED", "INVALID_TOKEN"), answer.body


# --- key rotation --------------------------------------------------------------------------

def _keys_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "common.auth", *args], capture_output=True, text=True, timeout=30)


def test_rotation_signs_with_the_new_key_and_old_tokens_keep_working(settings: Settings, customer: Customer) -> None:
    before = login(settings, customer.username, customer.password)["access_token"]
    old_kid = _kid(before)
    rotated = _keys_command("rotate")
    assert rotated.returncode == 0, rotated.stderr
    new_name = rotated.stdout.split()[2].rstrip(";")

    fresh: list[str] = []

    def signs_with_a_new_key() -> bool:
        fresh.append(login(settings, customer.username, customer.password)["access_token"])
        return _kid(fresh[-1]) != old_kid

    until(lambda: signs_with_a_new_key() or None, "svc_customer still signs with the old key", 5.0)
    listed = _keys_command("keys").stdout.splitlines()
    assert f"{new_name}\t{_kid(fresh[-1])}\tsigning" in listed, listed
    assert any(line.split("\t")[1:] == [old_kid, "verifying"] for line in listed), listed
    # Every service takes the new key's tokens and still the old key's.
    until(lambda: _accepted(settings, customer, fresh[-1]) or None, "the new key's token accepted", 5.0)
    assert _accepted(settings, customer, before)
    # The signing key cannot be retired, nor the previous one while its tokens may be alive.
    refused = _keys_command("retire", new_name)
    assert refused.returncode == 1 and "signing key" in refused.stderr
    previous = next(line.split("\t")[0] for line in listed if line.split("\t")[1] == old_kid)
    early = _keys_command("retire", previous)
    assert early.returncode == 1 and "may be alive" in early.stderr
    assert _accepted(settings, customer, before)


def test_tokens_of_a_retired_key_are_refused_everywhere(settings: Settings, customer: Customer) -> None:
    """A verification key is added to the live folder, its token accepted; once it is retired
    the same token is refused by every service (also where it was verified before and cached).
    A key of its own, rather than the stack's previous signing key, so that retiring it cannot
    cut off the tokens other tests of the shared stack hold."""
    folder = Path(settings.key_dir)
    name = f"test-{uuid.uuid4().hex[:12]}"
    private_pem, public_pem = _new_pair()
    private = Key.new(4, "public", private_pem)
    public_path = folder / f"{name}{auth.PUBLIC_SUFFIX}"
    public_path.write_bytes(public_pem)
    try:
        token = _sign(private, _claims(customer), {"kid": Key.new(4, "public", public_pem).to_paserk_id()})
        until(lambda: _accepted(settings, customer, token) or None, "the added key was not picked up", 5.0)
        retired = _keys_command("retire", name, "--now")
        assert retired.returncode == 0, retired.stderr
        assert not public_path.exists()
        time.sleep(auth.KeyWatch.RECHECK_S + 0.2)  # every process looks at the folder again by then
        _refused_everywhere(settings, customer, token, "INVALID_TOKEN")
    finally:
        public_path.unlink(missing_ok=True)


# --- sessions ------------------------------------------------------------------------------

def _sessions(settings: Settings, customer: Customer, token: str, query: str = "") -> Response:
    return rest(settings, "GET", f"/v1/customers/{customer.customer_id}/sessions{query}", token=token)


def test_a_customer_lists_and_ends_their_sessions(stack: Stack, settings: Settings) -> None:
    customer = onboard(settings)
    first = customer.session
    second = login(settings, customer.username, customer.password)
    refreshed = rest(settings, "POST", "/v1/sessions:refresh", {"refresh_token": first["refresh_token"]})
    assert refreshed.status == 200

    listed = _sessions(settings, customer, second["access_token"])
    assert listed.status == 200, listed.body
    sessions = listed.body["sessions"]
    assert [s["session_id"] for s in sessions] == [second["session_id"], first["session_id"]]  # newest first
    assert listed.body["next_page_token"] == ""
    by_id = {s["session_id"]: s for s in sessions}
    assert by_id[second["session_id"]]["current"] is True and by_id[first["session_id"]]["current"] is False
    assert by_id[second["session_id"]]["expire_time"] == second["refresh_token_expire_time"]
    assert "last_refresh_time" not in by_id[second["session_id"]] or by_id[second["session_id"]]["last_refresh_time"] is None
    assert by_id[first["session_id"]]["last_refresh_time"] >= by_id[first["session_id"]]["create_time"]
    # Never token material: only these fields, and no token's value anywhere in the answer.
    for session in sessions:
        assert set(session) <= {"session_id", "create_time", "last_refresh_time", "expire_time", "current"}
    text = json.dumps(listed.body)
    for secret in (first["access_token"], first["refresh_token"], second["access_token"], second["refresh_token"],
                   refreshed.body["access_token"], refreshed.body["refresh_token"]):
        assert secret not in text

    page = _sessions(settings, customer, second["access_token"], "?page_size=1")
    assert [s["session_id"] for s in page.body["sessions"]] == [second["session_id"]]
    rest_page = _sessions(settings, customer, second["access_token"], f"?page_size=1&page_token={page.body['next_page_token']}")
    assert [s["session_id"] for s in rest_page.body["sessions"]] == [first["session_id"]]
    assert _sessions(settings, customer, second["access_token"], "?page_token=garbage").reason == "INVALID_PAGE_TOKEN"

    # Ending the first session from the second: it leaves the list and its tokens die.
    ended = rest(settings, "DELETE", f"/v1/sessions/{first['session_id']}", token=second["access_token"])
    assert ended.status == 200, ended.body
    after = _sessions(settings, customer, second["access_token"]).body["sessions"]
    assert [s["session_id"] for s in after] == [second["session_id"]]
    assert rest(settings, "GET", "/v1/accounts", token=refreshed.body["access_token"]).reason == "SESSION_REVOKED"
    # A session revoked by refresh-token reuse leaves the list too.
    third = login(settings, customer.username, customer.password)
    rest(settings, "POST", "/v1/sessions:refresh", {"refresh_token": third["refresh_token"]})
    reused = rest(settings, "POST", "/v1/sessions:refresh", {"refresh_token": third["refresh_token"]})
    assert reused.reason == "SESSION_REVOKED"
    assert [s["session_id"] for s in _sessions(settings, customer, second["access_token"]).body["sessions"]] == \
        [second["session_id"]]


async def test_a_revoked_session_stays_revoked_when_redis_restarts(stack: Stack, settings: Settings) -> None:
    """Revocations live in Redis until the access tokens expire: a Redis killed and started
    again must not bring a logged-out session back to life (append-only file, devstack)."""
    customer = await asyncio.to_thread(onboard, settings)
    kept = await asyncio.to_thread(login, settings, customer.username, customer.password)
    ended = await asyncio.to_thread(rest, settings, "DELETE", f"/v1/sessions/{customer.session['session_id']}",
                                    None, customer.token)
    assert ended.status == 200, ended.body
    await asyncio.to_thread(kill9, stack, "redis")
    await stack.up(["redis"], out=sys.stderr)

    def answer(token: str) -> tuple[int, str | None]:
        response = rest(settings, "GET", "/v1/accounts", token=token)
        return response.status, response.reason

    # The services reconnect on their own; until then a check fails closed (AUTH_UNAVAILABLE).
    deadline = time.monotonic() + 30
    while (seen := await asyncio.to_thread(answer, kept["access_token"]))[0] != 200:
        assert time.monotonic() < deadline and seen == (503, "AUTH_UNAVAILABLE"), seen
        await asyncio.sleep(0.2)
    assert await asyncio.to_thread(answer, customer.token) == (401, "SESSION_REVOKED")


def test_sessions_of_someone_else_are_not_found(stack: Stack, settings: Settings, customer: Customer) -> None:
    other = onboard(settings)
    teller = login(settings, settings.teller_username, settings.teller_password)["access_token"]
    for token in (other.token, teller):
        answer = _sessions(settings, customer, token)
        assert answer.status == 404 and answer.reason == "CUSTOMER_NOT_FOUND", answer.body
    assert _sessions(settings, customer, "").status == 401


async def test_concurrent_revocation_checks_share_round_trips_and_see_every_revocation(
        stack: Stack, settings: Settings) -> None:
    """The interceptor's revocation check (common/auth.Revocations) against the real Redis: checks
    made together share MGETs, each still gets its own session's answer, and a revocation that
    completed before a check started is seen by it, even while other checks are under way."""
    client = auth.redis_client(settings)
    revocations = auth.Revocations(client, settings.access_token_ttl_s)
    try:
        sessions = [f"test-{uuid.uuid4()}" for _ in range(100)]
        for session_id in sessions[::3]:
            await revocations.revoke(session_id)

        async def lookups() -> int:
            """Commands that can read a revocation, sent to Redis so far."""
            stats = await client.info("commandstats")
            return sum(int(stats.get(f"cmdstat_{command}", {}).get("calls", 0)) for command in ("mget", "exists", "get"))

        before = await lookups()
        answers = await asyncio.gather(*(revocations.is_revoked(s) for s in sessions + sessions))
        assert answers == [i % 3 == 0 for i in range(100)] * 2
        assert await lookups() - before - 1 < len(answers) / 4  # (-1: the INFO of lookups() is none of them)

        # A stream of checks of one session: once revoke() has returned, every check begun after it says revoked.
        target = f"test-{uuid.uuid4()}"
        early = [asyncio.create_task(revocations.is_revoked(target)) for _ in range(20)]
        await revocations.revoke(target)
        started_after_revocation = [asyncio.create_task(revocations.is_revoked(target)) for _ in range(20)]
        await asyncio.gather(*early)
        assert await asyncio.gather(*started_after_revocation) == [True] * 20
    finally:
        await client.aclose()

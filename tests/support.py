"""What many tests need: a REST client for Envoy (and one that retries as API.md tells clients
to), Mailpit's API, the customer journey (register → email → verify → credentials → login) as
one call, and a component killed with SIGKILL (and started again)."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from common.config import Settings
from devstack import proc
from devstack.stack import Stack
from tests.secret_scan import REGISTRY

T = TypeVar("T")

ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo"
STRONG_PASSWORD = "correct-horse-battery-staple"


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: Any

    @property
    def reason(self) -> str | None:
        """The ErrorInfo reason of an error body."""
        if not isinstance(self.body, dict):
            return None
        for detail in self.body.get("details", []):
            if detail.get("@type") == ERROR_INFO_TYPE:
                return str(detail["reason"])
        return None


def rest(settings: Settings, method: str, path: str, body: Any = None, token: str | None = None,
         headers: dict[str, str] | None = None) -> Response:
    """One REST call through Envoy. Every secret it carries or brings back is remembered, so
    the end of the session can check that no log holds it (tests/secret_scan.py)."""
    REGISTRY.remember_fields(body)
    for secret in [token or "", *(v.partition(" ")[2] for k, v in (headers or {}).items() if k.lower() == "authorization")]:
        REGISTRY.remember(secret, password=False)
    response = _rest(settings, method, path, body, token, headers)
    REGISTRY.remember_fields(response.body)
    return response


def _rest(settings: Settings, method: str, path: str, body: Any, token: str | None,
          headers: dict[str, str] | None) -> Response:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{settings.envoy_port}{path}", data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=15) as resp:
            raw = resp.read()
            return Response(resp.status, dict(resp.headers), json.loads(raw) if raw else None)
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            parsed: Any = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode("utf-8", "replace")
        return Response(err.code, dict(err.headers), parsed)


@dataclass(frozen=True)
class Attempt:
    """One send of a Request."""
    sent_s: float  # time.monotonic()
    answered_s: float
    response: Response | None  # None: no answer (connection refused or reset, a timeout)
    error: str = ""  # the connection error's type, when there was no answer

    @property
    def answer(self) -> str:
        """"200", "503 STORAGE_UNAVAILABLE", or the connection error's type."""
        if self.response is None:
            return self.error
        return f"{self.response.status} {self.response.reason or ''}".strip()


@dataclass
class Request:
    """One logical POST of an API client; every retry sends exactly this (same request_id, same
    body), as API.md tells clients to (AIP-155)."""
    path: str
    body: dict[str, Any]
    token: str
    attempts: list[Attempt] = field(default_factory=list)
    first: Response | None = None  # the first answer that ended a send: what any retry must repeat

    @property
    def request_id(self) -> str:
        return str(self.body["request_id"])

    @property
    def transfer_id(self) -> str | None:
        """The transfer of the first answer, when that was a 200."""
        if self.first is None or self.first.status != 200:
            return None
        return str(self.first.body["transfer_id"])


def send_with_retries(settings: Settings, request: Request, final: Callable[[Response], bool], window_s: float,
                      pause_s: float) -> Response | None:
    """POSTs the request through Envoy until an answer `final` accepts, sending it again pause_s
    after any other answer or no answer at all (the outcome is then unknown: the request_id
    makes the retry safe), for window_s at most. Every send is recorded in request.attempts, the
    first final answer in request.first. Returns the final answer; None if none came in time."""
    deadline = time.monotonic() + window_s
    while True:
        sent_s = time.monotonic()
        try:
            response: Response | None = rest(settings, "POST", request.path, request.body, token=request.token)
            error = ""
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out: outcome unknown
            response, error = None, type(exc).__name__
        request.attempts.append(Attempt(sent_s, time.monotonic(), response, error))
        if response is not None and final(response):
            if request.first is None:
                request.first = response
            return response
        if time.monotonic() > deadline:
            return None
        time.sleep(pause_s)


def mailpit_messages(settings: Settings, query: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{settings.mailpit_http_port}/api/v1/search?query={urllib.parse.quote(query)}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return list(json.load(resp)["messages"])


def mail_count(settings: Settings, email: str) -> int:
    """How many emails Mailpit holds for this address."""
    query = urllib.parse.quote(f'to:"{email}"')
    url = f"http://127.0.0.1:{settings.mailpit_http_port}/api/v1/search?query={query}&limit=1"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return int(json.load(resp)["messages_count"])


def mailpit_text(settings: Settings, message_id: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{settings.mailpit_http_port}/api/v1/message/{message_id}",
                                timeout=5) as resp:
        return str(json.load(resp)["Text"])


def until(probe: Callable[[], T | None], what: str, timeout_s: float = 20.0, interval_s: float = 0.1) -> T:
    """The first answer of probe that is not None, asked every interval_s; fails the test when
    none came within timeout_s (a bound against a hang, never a measure of speed). The one
    polling helper of the tests (async code runs it in a thread: asyncio.to_thread)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s}s")
        time.sleep(interval_s)


async def until_async(probe: Callable[[], Awaitable[T | None]], what: str, timeout_s: float = 20.0,
                      interval_s: float = 0.1) -> T:
    """until() for a probe that is a coroutine on the test's event loop (a grpc.aio call)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s}s")
        await asyncio.sleep(interval_s)


def wait_for_verification_code(settings: Settings, email: str, timeout_s: float = 20.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = mailpit_messages(settings, f'to:"{email}"')
        if found:
            match = re.search(r"^Verification code: (\d+)\s*$", mailpit_text(settings, found[0]["ID"]), re.MULTILINE)
            assert match, "the email has no 'Verification code: <code>' line"
            REGISTRY.remember_code(match.group(1), email)
            return match.group(1)
        time.sleep(0.1)
    raise AssertionError(f"no verification email for {email} in Mailpit after {timeout_s}s")


def wait_for_code(settings: Settings, email: str, label: str = "Verification code", count: int = 1,
                  timeout_s: float = 30.0, *owners: str) -> str:
    """The code on the line "<label>: <code>" of the newest email to this address holding such a
    line, once there are at least count of them (a resend waits for its own email). The code is
    remembered with the address and owners, for the log scan."""
    deadline = time.monotonic() + timeout_s
    pattern = re.compile(rf"^{re.escape(label)}: (\d+)\s*$", re.MULTILINE)
    while time.monotonic() < deadline:
        codes = []
        for message in mailpit_messages(settings, f'to:"{email}"'):  # newest first
            match = pattern.search(mailpit_text(settings, message["ID"]))
            if match:
                codes.append(match.group(1))
        if len(codes) >= count:
            REGISTRY.remember_code(codes[0], email, *owners)
            return codes[0]
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} emails with '{label}: <code>' for {email} after {timeout_s}s")


def unique_email(prefix: str = "c") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}@example.com"


@dataclass
class Customer:
    customer_id: str
    email: str
    username: str
    password: str
    session: dict[str, Any]

    @property
    def token(self) -> str:
        return str(self.session["access_token"])


def register(settings: Settings, email: str | None = None) -> dict[str, Any]:
    response = rest(settings, "POST", "/v1/customers", {"email": email or unique_email(), "full_name": "Test Customer"})
    assert response.status == 200, response.body
    return dict(response.body)


def verify(settings: Settings, customer: dict[str, Any]) -> str:
    code = wait_for_verification_code(settings, customer["email"])
    REGISTRY.remember_code(code, customer["customer_id"])
    response = rest(settings, "POST", f"/v1/customers/{customer['customer_id']}:verifyEmail", {"code": code})
    assert response.status == 200, response.body
    return str(response.body["enrollment_token"])


def onboard(settings: Settings) -> Customer:
    """A verified customer with credentials and a live session."""
    customer = register(settings)
    enrollment_token = verify(settings, customer)
    username = f"u{uuid.uuid4().hex[:12]}"
    response = rest(settings, "POST", "/v1/credentials",
                    {"enrollment_token": enrollment_token, "username": username, "password": STRONG_PASSWORD})
    assert response.status == 200, response.body
    session = login(settings, username, STRONG_PASSWORD)
    return Customer(customer["customer_id"], customer["email"], username, STRONG_PASSWORD, session)


def login(settings: Settings, username: str, password: str) -> dict[str, Any]:
    response = rest(settings, "POST", "/v1/sessions", {"username": username, "password": password})
    assert response.status == 200, response.body
    return dict(response.body)


def kill9(stack: Stack, name: str) -> None:
    """SIGKILL every process of the component (its whole process group), by its pid file."""
    for component in stack.expand([name]):
        pidfile = stack.pidfile(component)
        record = proc.read_pidfile(pidfile)
        assert proc.alive(record), f"{component} is not running"
        assert record is not None
        os.killpg(record.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while proc.alive(record) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not proc.alive(record), f"{component} survived SIGKILL"
        pidfile.unlink(missing_ok=True)


def children(stack: Stack, name: str) -> list[Path]:
    """/proc entries of the direct children of each process of the component."""
    found = []
    for component in stack.expand([name]):
        record = proc.read_pidfile(stack.pidfile(component))
        assert record is not None, f"{component} is not running"
        found += [Path(f"/proc/{pid}") for pid in Path(f"/proc/{record.pid}/task/{record.pid}/children").read_text().split()]
    return found


async def kill_and_restart(stack: Stack, name: str, down_s: float = 0.0) -> None:
    """kill9 of the component, down_s of it down, then the launcher starts it again."""
    # kill9 waits for the component's own process; for Postgres that is `runuser`, and the
    # postmaster under it lingers as a zombie for a moment, its pid still in postmaster.pid: a
    # start before it is reaped refuses ("lock file already exists").
    orphans = children(stack, name)
    await asyncio.to_thread(kill9, stack, name)
    await asyncio.to_thread(until, lambda: all(not p.exists() for p in orphans) or None, f"{name}'s children reaped", 30)
    await asyncio.sleep(down_s)
    await stack.up([name], out=sys.stderr)


async def during_fault(stack: Stack, load: AbstractContextManager[Any], fault: Callable[[], Awaitable[None]],
                       before_s: float, after_s: float) -> tuple[float, float]:
    """The fault while the load runs, before_s of load before it and after_s after it; whatever
    happens, the whole stack is started again for the tests after. Returns when the fault began
    and when it ended (time.monotonic())."""
    try:
        with load:
            await asyncio.sleep(before_s)
            began_s = time.monotonic()
            await fault()
            ended_s = time.monotonic()
            await asyncio.sleep(after_s)
    finally:
        await stack.up(out=sys.stderr)
    return began_s, ended_s

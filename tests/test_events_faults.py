"""Fault tests of the asynchronous half: during a stream of real transfers through Envoy, a real
process of the stack is killed with SIGKILL (through the launcher's pid files) and started
again with the launcher. After recovery every committed movement (the ledger's own list, read
back through ListTransfers) has exactly one statement line per side and exactly one email per
party, and the balances add up. Each test leaves the whole stack up for the tests after it."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from common.config import Settings
from devstack.stack import Stack
from tests.events_support import Holder, deposit, holder, statement, teller_token, until
from tests.support import kill9, mail_count, rest

PEOPLE = 4
STREAM_BEFORE_S = 3.0  # transfers before the fault
STREAM_AFTER_S = 3.0  # and after the component is back
TRANSFER_PAUSE_S = 0.05
CONVERGE_S = 90.0


class Stream:
    """Transfers between the people, one after another in a thread, until stopped."""

    def __init__(self, settings: Settings, people: list[Holder]) -> None:
        self._settings = settings
        self._people = people
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.attempted = 0
        self.committed = 0

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            source, target = self._people[n % len(self._people)], self._people[(n + 1) % len(self._people)]
            n += 1
            self.attempted += 1
            try:
                response = rest(self._settings, "POST", "/v1/transfers", {
                    "request_id": uuid.uuid4().hex, "from_account_id": source.account_id,
                    "to_account_id": target.account_id, "amount": 1 + n % 7, "currency": "USD"}, token=source.token)
                if response.status == 200:
                    self.committed += 1
            except OSError:
                pass  # Envoy without a healthy upstream, or a timeout: the ledger says what committed
            time.sleep(TRANSFER_PAUSE_S)

    def __enter__(self) -> Stream:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@pytest.fixture(scope="module")
def people(stack: Stack, settings: Settings) -> list[Holder]:
    teller = teller_token(settings)
    found = [holder(settings) for _ in range(PEOPLE)]
    for person in found:
        deposit(settings, teller, person.account_id, 1_000_000)
    return found


def _ledger(settings: Settings, person: Holder) -> list[dict[str, Any]]:
    """The account's committed movements, from the ledger (strongly consistent)."""
    movements: list[dict[str, Any]] = []
    page_token = ""
    for _ in range(100):
        query = "?page_size=500" + (f"&page_token={page_token}" if page_token else "")
        response = rest(settings, "GET", f"/v1/accounts/{person.account_id}/transfers{query}", token=person.token)
        assert response.status == 200, response.body
        movements += response.body.get("transfers", [])
        page_token = response.body.get("next_page_token", "")
        if not page_token:
            return movements
    raise AssertionError("more than 100 pages of transfers")


def _balance(settings: Settings, person: Holder) -> int:
    response = rest(settings, "GET", f"/v1/accounts/{person.account_id}", token=person.token)
    assert response.status == 200, response.body
    return int(response.body["balance"])


def _check_converged(settings: Settings, people: list[Holder]) -> None:
    """Every committed movement once in each statement it touches and once in each inbox."""
    for person in people:
        movements = _ledger(settings, person)
        ledger_ids = sorted(m["transfer_id"] for m in movements)

        def statement_done(person: Holder = person, ledger_ids: list[str] = ledger_ids) -> list[dict[str, Any]] | None:
            lines = statement(settings, person.token, person.account_id, unavailable_ok=True)
            if lines is None:
                return None  # Cassandra is back, the service's session not yet: ask again
            ids = sorted(line["transfer_id"] for line in lines)
            assert len(ids) == len(set(ids)), "a movement has two statement lines"
            assert set(ids) <= set(ledger_ids), "a statement line without a committed movement"
            return lines if ids == ledger_ids else None

        lines = until(statement_done, f"statement of {person.account_id} complete", CONVERGE_S, interval_s=0.5)
        balance = _balance(settings, person)
        assert sum(int(line["amount"]) for line in lines) == balance
        assert int(lines[0]["balance_after"]) == balance

        expected_mails = 1 + len(movements)  # the verification email, then one per movement

        def mails_done(person: Holder = person, expected: int = expected_mails) -> int | None:
            count = mail_count(settings, person.email)
            assert count <= expected, f"{person.email}: {count} emails for {expected} expected: a duplicate"
            return count if count == expected else None

        until(mails_done, f"{expected_mails} emails to {person.email}", CONVERGE_S, interval_s=0.5)
    total = sum(_balance(settings, p) for p in people)
    assert total == PEOPLE * 1_000_000, "transfers between the people changed their total"


async def _scenario(stack: Stack, settings: Settings, people: list[Holder],
                    fault: Callable[[], Awaitable[None]]) -> None:
    try:
        with Stream(settings, people) as stream:
            await asyncio.sleep(STREAM_BEFORE_S)
            await fault()
            await asyncio.sleep(STREAM_AFTER_S)
        assert stream.committed > 0
    finally:
        await stack.up(out=sys.stderr)  # whatever happened, the whole stack is back for the next tests
    await asyncio.to_thread(_check_converged, settings, people)


async def _kill_and_restart(stack: Stack, name: str, down_s: float = 0.0) -> None:
    await asyncio.to_thread(kill9, stack, name)
    await asyncio.sleep(down_s)
    await stack.up([name], out=sys.stderr)


async def test_svc_notify_killed_mid_stream(stack: Stack, settings: Settings, people: list[Holder]) -> None:
    await _scenario(stack, settings, people, lambda: _kill_and_restart(stack, "svc_notify"))


async def test_kafka_broker_killed_mid_stream(stack: Stack, settings: Settings, people: list[Holder]) -> None:
    await _scenario(stack, settings, people, lambda: _kill_and_restart(stack, "kafka", down_s=2.0))


async def test_cassandra_killed_mid_stream(stack: Stack, settings: Settings, people: list[Holder]) -> None:
    await _scenario(stack, settings, people, lambda: _kill_and_restart(stack, "cassandra"))


async def test_mailpit_down_for_30_seconds(stack: Stack, settings: Settings, people: list[Holder]) -> None:
    await _scenario(stack, settings, people, lambda: _kill_and_restart(stack, "mailpit", down_s=30.0))


async def test_outbox_relay_killed_mid_batch(stack: Stack, settings: Settings, people: list[Holder]) -> None:
    # Both svc_transfer processes: whichever holds the relay dies with a batch in flight.
    await _scenario(stack, settings, people, lambda: _kill_and_restart(stack, "svc_transfer"))

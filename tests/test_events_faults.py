"""Fault tests of the asynchronous half: during a stream of real transfers through Envoy, a real
process of the stack is killed with SIGKILL (through the launcher's pid files) and started
again with the launcher. After recovery every committed movement (the ledger's own list, read
back through ListTransfers) has exactly one statement line per side and exactly one email per
party, and the balances add up. Each test leaves the whole stack up for the tests after it."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Awaitable, Callable

import pytest

from common.config import Settings
from devstack.stack import Stack
from tests.events_support import Holder, check_converged, funded_people
from tests.support import during_fault, kill_and_restart, rest

PEOPLE = 4
STREAM_BEFORE_S = 3.0  # transfers before the fault
STREAM_AFTER_S = 3.0  # and after the component is back
TRANSFER_PAUSE_S = 0.05
FUNDS = 1_000_000


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
    return funded_people(settings, PEOPLE, FUNDS)


async def _scenario(stack: Stack, settings: Settings, people: list[Holder],
                    fault: Callable[[], Awaitable[None]]) -> None:
    stream = Stream(settings, people)
    await during_fault(stack, stream, fault, STREAM_BEFORE_S, STREAM_AFTER_S)
    assert stream.committed > 0
    await asyncio.to_thread(check_converged, settings, people, PEOPLE * FUNDS)


async def test_svc_notify_killed_mid_stream(stack: Stack, settings: Settings, people: list[Holder]) -> None:
    await _scenario(stack, settings, people, lambda: kill_and_restart(stack, "svc_notify"))


async def test_kafka_broker_killed_mid_stream(stack: Stack, settings: Settings, people: list[Holder]) -> None:
    await _scenario(stack, settings, people, lambda: kill_and_restart(stack, "kafka", down_s=2.0))


async def test_cassandra_killed_mid_stream(stack: Stack, settings: Settings, people: list[Holder]) -> None:
    await _scenario(stack, settings, people, lambda: kill_and_restart(stack, "cassandra"))


async def test_mailpit_down_for_30_seconds(stack: Stack, settings: Settings, people: list[Holder]) -> None:
    await _scenario(stack, settings, people, lambda: kill_and_restart(stack, "mailpit", down_s=30.0))


async def test_outbox_relay_killed_mid_batch(stack: Stack, settings: Settings, people: list[Holder]) -> None:
    # Both svc_transfer processes: whichever holds the relay dies with a batch in flight.
    await _scenario(stack, settings, people, lambda: kill_and_restart(stack, "svc_transfer"))

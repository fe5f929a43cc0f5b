"""Holds through a crash (API.md "Holds", design holds.md section 6): a stream of holds placed,
posted (all or part), voided, aged past their expiry and settled again, by REST through Envoy
from a few threads, while Postgres or svc_transfer is killed with SIGKILL and started again.
Clients retry what was not answered (connection errors, 502/503/504, LEDGER_BUSY) with the
same request_id, a bounded number of times, as API.md tells them to. Afterwards every answer
agrees with the ledger, a retry of every request_id returns the first answer, no request was
answered 500, every account's balance - available_balance is the sum of its PENDING holds, and
the books balance. Each test leaves the whole stack up for the tests after it."""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from common.config import Settings
from devstack.stack import Stack
from tests import figures
from tests.events_support import Holder, account_balances, funded_people, teller_token
from tests.ledger_support import TransferRow, age_holds, holds_invariants, sql, transfer_rows
from tests.support import Request, Response, during_fault, kill_and_restart, send_with_retries, until

PEOPLE = 4
THREADS = 5
FUNDS = 1_000_000  # far above what the stream holds: no refusal depends on timing
HOLD_SECONDS = 3_600  # aged by as much to lapse; none lapses by itself during a test
STREAM_BEFORE_S = 3.0  # requests before the fault
STREAM_AFTER_S = 4.0  # and after the component is back
STEP_PAUSE_S = 0.02
RETRY_WINDOW_S = 45.0  # a request unanswered for this long is left for the replay at the end
RETRY_PAUSE_S = 0.25
RETRYABLE_STATUSES = {429, 502, 503, 504}
RETRYABLE_REASONS = {"LEDGER_BUSY"}
EXPECTED_REFUSALS = {"TRANSFER_NOT_PENDING", "HOLD_EXPIRED"}


@dataclass
class Hold:
    transfer_id: str
    payer: Holder
    payee: Holder
    held: int
    aged: bool = False
    settlements: list[Request] = field(default_factory=list)


def answer(response: Response) -> tuple[Any, ...]:
    """What a retry must repeat: the transfer as answered, or the refusal's status and reason."""
    if response.status == 200:
        body = response.body
        return 200, body["transfer_id"], body["status"], body["amount"], body.get("held_amount")
    return response.status, response.reason


def final(response: Response) -> bool:
    """An answer that is not an error worth a retry."""
    return response.status not in RETRYABLE_STATUSES and response.reason not in RETRYABLE_REASONS


def answered_500(requests: list[Request]) -> list[tuple[str, Any]]:
    """(path, body) of every answer 500 or above that is not an error worth a retry."""
    return [(r.path, a.response.body) for r in requests for a in r.attempts
            if a.response is not None and a.response.status >= 500 and a.response.status not in RETRYABLE_STATUSES]


class Load:
    """Place, post, void, age and settle-again holds among the people, from THREADS threads,
    until stopped; every request and its first answer is kept for the checks."""

    def __init__(self, settings: Settings, people: list[Holder], teller: str, seed: int) -> None:
        self._settings = settings
        self._people = people
        self._teller = teller
        self._seed = seed
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(THREADS)]
        self.placements: list[Request] = []
        self.holds: dict[str, Hold] = {}
        self._open: list[Hold] = []  # PENDING, and nobody asked to settle or age it
        self._done: list[Hold] = []  # a settlement was answered (or given up on), or it was aged
        self.errors: list[str] = []
        self.fault_s: tuple[float, float] = (0.0, 0.0)  # from the SIGKILL to the component's start

    def send(self, request: Request) -> Response | None:
        """The first answer worth keeping, retrying the very same request; None if none came
        within RETRY_WINDOW_S (the replay at the end asks again)."""
        return send_with_retries(self._settings, request, final, RETRY_WINDOW_S, RETRY_PAUSE_S)

    def _place(self, rng: random.Random) -> None:
        payer, payee = rng.sample(self._people, 2)
        request = Request("/v1/transfers", {
            "request_id": f"h-{uuid.uuid4().hex}", "from_account_id": payer.account_id,
            "to_account_id": payee.account_id, "amount": str(rng.randint(1, 500)), "currency": "USD",
            "description": "deposit", "hold_seconds": HOLD_SECONDS}, payer.token)
        with self._lock:
            self.placements.append(request)
        response = self.send(request)
        if response is not None and response.status == 200:
            with self._lock:
                self._open.append(self.register(request, response))

    def register(self, placement: Request, response: Response) -> Hold:
        transfer_id = response.body["transfer_id"]
        if transfer_id not in self.holds:
            by_account = {p.account_id: p for p in self._people}
            self.holds[transfer_id] = Hold(transfer_id, by_account[placement.body["from_account_id"]],
                                           by_account[placement.body["to_account_id"]], int(placement.body["amount"]))
        return self.holds[transfer_id]

    def _settle(self, rng: random.Random, held: Hold, verb: str) -> None:
        body: dict[str, Any] = {"request_id": f"s-{uuid.uuid4().hex}"}
        if verb == "post" and rng.random() < 0.5:
            body["amount"] = str(rng.randint(1, held.held))  # a part; the rest is released
        token = held.payee.token if rng.random() < 0.7 else self._teller
        request = Request(f"/v1/transfers/{held.transfer_id}:{verb}", body, token)
        with self._lock:
            held.settlements.append(request)
        self.send(request)
        with self._lock:
            self._done.append(held)

    def _age(self, held: Hold) -> None:
        """Its expire_time to the past, by the one write the tests make; retried while Postgres is
        away (aging twice only moves it further into the past)."""
        deadline = time.monotonic() + RETRY_WINDOW_S
        in_doubt = False
        while True:
            try:
                moved = age_holds(self._settings, [held.transfer_id], HOLD_SECONDS)
                # Nothing else settles it: still PENDING, unless a first attempt did commit and the
                # worker released it since.
                assert moved == 1 or in_doubt, held.transfer_id
                held.aged = True
                with self._lock:
                    self._done.append(held)  # only now: a settlement sent after this must meet HOLD_EXPIRED
                return
            except psycopg.OperationalError:
                in_doubt = True
                if time.monotonic() > deadline:
                    raise
                time.sleep(RETRY_PAUSE_S)

    def _step(self, rng: random.Random) -> None:
        roll = rng.random()
        with self._lock:
            held = self._open.pop(rng.randrange(len(self._open))) if roll >= 0.4 and self._open else None
            again = rng.choice(self._done) if self._done else None
        if held is None:
            if roll >= 0.93 and again is not None:  # a second settlement: refused
                self._settle(rng, again, rng.choice(("post", "void")))
            else:
                self._place(rng)
        elif roll < 0.65:
            self._settle(rng, held, "post")
        elif roll < 0.85:
            self._settle(rng, held, "void")
        else:
            self._age(held)

    def _run(self, index: int) -> None:
        rng = random.Random(self._seed + index)
        while not self._stop.is_set():
            try:
                self._step(rng)
            except Exception as error:  # the test fails on it in check(), once the stack is back
                with self._lock:
                    self.errors.append(repr(error))
                return
            time.sleep(STEP_PAUSE_S)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=RETRY_WINDOW_S + 30)
        assert not any(thread.is_alive() for thread in self._threads)


@pytest.fixture
def people(stack: Stack, settings: Settings) -> list[Holder]:
    return funded_people(settings, PEOPLE, FUNDS)


def check(settings: Settings, load: Load, people: list[Holder]) -> None:
    assert load.errors == []
    requests = load.placements + [r for h in load.holds.values() for r in h.settlements]
    retried = sum(1 for r in requests if len(r.attempts) > 1 or r.first is None)
    killed_s, back_s = load.fault_s
    assert any(killed_s <= r.attempts[0].sent_s <= back_s for r in requests), \
        "no request was sent while the component was down"
    # A retry of every request_id returns the first answer; a request never answered is answered now.
    with ThreadPoolExecutor(4) as pool:
        replays = list(pool.map(load.send, requests))
    assert all(replay is not None for replay in replays), "a request still unanswered after the stack came back"
    for request, replay in zip(requests, replays, strict=True):
        assert request.first is not None and replay is not None
        assert answer(replay) == answer(request.first), (request.path, request.body, request.first, replay)
    for placement in load.placements:  # a placement first answered by its replay
        assert placement.first is not None and placement.first.status == 200, placement.first
        load.register(placement, placement.first)
    assert answered_500(requests) == []
    refusals = Counter(r.first.reason for r in requests if r.first is not None and r.first.status != 200)
    assert set(refusals) <= EXPECTED_REFUSALS, refusals
    figures.report(f"holds under SIGKILL: {len(load.placements)} holds, {len(requests)} requests, {retried} retried "
                   f"during the load ({sum(len(r.attempts) for r in requests)} sends with the replays), "
                   f"refusals {dict(refusals)}")

    # The release worker catches up with the aged holds, even those aged while it was down.
    ids = sorted(load.holds)

    def rows() -> dict[str, TransferRow] | None:
        found = transfer_rows(settings, ids)
        lapsed = [i for i in ids if load.holds[i].aged and found[i].status == "PENDING"]
        return None if lapsed else found

    ledger = until(rows, "the aged holds released", 30)

    # Every answer agrees with the ledger.
    balances = {p.account_id: FUNDS for p in people}
    pending = Counter[str]()
    statuses: Counter[str] = Counter()
    for transfer_id, held in load.holds.items():
        status, amount, held_amount, source, target = ledger[transfer_id]
        assert (held_amount, source, target) == (held.held, held.payer.account_id, held.payee.account_id)
        assert held_amount is not None and source is not None and target is not None  # as just checked: for mypy
        wins = [r.first for r in held.settlements if r.first is not None and r.first.status == 200]
        assert len(wins) <= 1, (transfer_id, wins)  # settled at most once
        if wins:
            assert (wins[0].body["status"], int(wins[0].body["amount"])) == (status, amount), (transfer_id, wins)
            assert not held.aged
        else:
            assert status == ("EXPIRED" if held.aged else "PENDING"), (transfer_id, status)
        for request in held.settlements:
            assert request.first is not None
            if request.first.reason == "HOLD_EXPIRED":
                assert status == "EXPIRED", transfer_id
            if request.first.reason == "TRANSFER_NOT_PENDING":
                assert status != "PENDING", transfer_id
        if status == "COMPLETED":
            assert 0 < amount <= held_amount
            balances[source] -= amount
            balances[target] += amount
        if status == "PENDING":
            pending[source] += held_amount
        statuses[status] += 1
    figures.report(f"holds under SIGKILL, by status: {dict(statuses)}")
    assert statuses["COMPLETED"] and statuses["VOIDED"] and statuses["EXPIRED"]  # the mix did what it meant to
    for person in people:
        expected = (balances[person.account_id], balances[person.account_id] - pending[person.account_id])
        assert account_balances(settings, person) == expected, person.account_id
    holds_invariants(settings, [p.account_id for p in people])
    assert sql(settings, "SELECT currency, sum(balance) FROM transfer.ledger_accounts GROUP BY currency"
                         " HAVING sum(balance) <> 0") == []  # cash included: money is conserved


async def scenario(stack: Stack, settings: Settings, people: list[Holder], fault: Callable[[], Awaitable[None]],
                   seed: int) -> None:
    load = Load(settings, people, teller_token(settings), seed)
    load.fault_s = await during_fault(stack, load, fault, STREAM_BEFORE_S, STREAM_AFTER_S)
    await asyncio.to_thread(check, settings, load, people)


async def test_holds_survive_postgres_killed_mid_stream(stack: Stack, settings: Settings, people: list[Holder]) -> None:
    await scenario(stack, settings, people, lambda: kill_and_restart(stack, "postgres"), seed=18)


async def test_holds_survive_svc_transfer_killed_mid_stream(stack: Stack, settings: Settings,
                                                            people: list[Holder]) -> None:
    # Both processes: batches, releases and relay batches in flight die with them.
    await scenario(stack, settings, people, lambda: kill_and_restart(stack, "svc_transfer"), seed=1818)

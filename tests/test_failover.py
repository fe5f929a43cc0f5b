"""The whole bank through a failover of its PostgreSQL (issue #19, point 4), as its clients see it.

A second bank stack in the HA mode, in a stack folder of its own with its ports moved (PORTS), so
it runs beside the default stack the other tests use and leaves it alone: etcd, three Patroni
nodes, its own Redis and Kafka, Envoy, svc_customer, svc_account, svc_notify and svc_transfer with
its usual two processes (the outbox relay is one of them at a time, by an advisory lock the old
leader takes with it: across a failover either process may relay next, as in production).
svc_account's statements and svc_notify's notification log go to the default stack's Cassandra,
and svc_notify's emails to the default stack's Mailpit: this stack's launcher reuses them as it
reuses any healthy component it did not start (their ports are the only ones not moved), and
`down` leaves them running (checked at teardown). Nothing here needs Prometheus or the web app:
accounts are opened in the ledger with the service token, and the load's customers and a teller
get tokens minted with this stack's keys (tests/tokens.py); those customers never registered, so
svc_notify knows no address of theirs and emails nobody about the load.

Under a transfer load through this stack's Envoy (REST, CLIENTS threads; each request sent again
with the same request_id after any answer but 200, or a connection error, until it gets its 200, as
an API client does) it kills the leader: (a) its postmaster, (b) the whole node (Patroni and its
postmaster; then starts it again, as a supervisor would). After each: every acknowledged transfer
is in the ledger (read on the HA leader), each request_id moved money exactly once, money is
conserved and no balance is negative, a request sent after the kill got a 200 within 30 s, nothing
was answered 500, the old leader is a replica again, and the MoneyMoved event of every acknowledged
movement is on this stack's Kafka exactly once.

And the background workers that write to Postgres resume on the new leader (issue #19, point 2):
holds placed before the kill (hold_seconds far ahead) are made to lapse after it (age_holds, on the
leader); the release worker of svc_transfer turns them EXPIRED, their payers' available balance is
their balance again, and each HoldExpired is on this stack's Kafka exactly once; and a customer
registered through this stack's Envoy after the failover is projected by svc_notify's consumer into
notify.customer_contacts on the new leader, and gets its verification email in Mailpit. Margins are
wide: these machines are noisy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from bank.events.v1 import events_pb2

from common import config
from common.events import TRANSFER_TOPIC
from devstack.components import SERVICES, Component, all_components
from devstack.stack import Stack
from svc_notify.consumer import GROUP_ID, TRANSFER_GROUP_ID
from tests import figures
from tests.events_support import lag_measured, read_topic
from tests.ha_support import back_as_replica, kill_the_leader, leader, leader_with_sync_standby, own_ha_stack
from tests.ledger_support import Account, Bank, age_holds, holds_invariants, sql, transfer_rows
from tests.support import Request, register, send_with_retries, until, wait_for_verification_code
from tests.tokens import test_tokens

# Every port of the second stack but those of the default stack's components it reuses (REUSED),
# moved, even those of what it leaves out: away from the default stack's and from
# tests/test_ha.py's cluster (12379, 15432-15435, 18008-18011), and below the kernel's ephemeral
# range (32768 and up), where an outgoing connection could take one first.
# The services' private ports are these + 100 * (i + 1).
GRPC_PORTS = {name: 31051 + i for i, name in enumerate(SERVICES)}
PORTS = {
    "BANK_ETCD_PORT": "22379", "BANK_PG_PORT": "25432", "BANK_PATRONI_PORT": "28008", "BANK_REDIS_PORT": "26379",
    "BANK_KAFKA_BOOTSTRAP": "127.0.0.1:29092", "BANK_KAFKA_CONTROLLER_PORT": "29093",
    "BANK_ENVOY_PORT": "28080", "BANK_ENVOY_ADMIN_PORT": "29901", "BANK_ENVOY_TLS_PORT": "28443",
    "BANK_WEB_PORT": "28070", "BANK_PROMETHEUS_PORT": "29090",
    **{f"BANK_{name.upper()}_GRPC_PORT": str(port) for name, port in GRPC_PORTS.items()},
    **{f"BANK_{name.upper()}_ADDR": f"127.0.0.1:{port}" for name, port in GRPC_PORTS.items()},
    **{f"BANK_{name.upper()}_METRICS_PORT": str(29101 + i) for i, name in enumerate(SERVICES)},
}
# What of all_components this stack leaves out: nothing it runs needs them (Envoy's route to the
# web app has no client here).
NOT_STARTED = ("web", "prometheus")
# The default stack's, which this stack reuses and must leave running.
REUSED = ("cassandra", "mailpit")

ACCOUNTS = 16
FUNDS = 1_000_000  # per account, far above what the load moves: no transfer is refused for funds
AMOUNT_MAX = 100
CLIENTS = 6
ACKNOWLEDGED_BEFORE_KILL = 300
FAILOVER_WINDOW_MAX_S = 30.0
REJOIN_TIMEOUT_S = 120.0
REQUEST_DEADLINE_S = 90.0  # a request without its 200 after this long is reported unresolved
RETRY_PAUSE_S = 0.2
REPLAYS = 100  # requests acknowledged before the kill, sent again after it
LOAD_STOP_TIMEOUT_S = REQUEST_DEADLINE_S + 30
OUTBOX_DRAIN_TIMEOUT_S = 90.0
KAFKA_READ_TIMEOUT_S = 90.0
HOLDS = 4  # placed before the kill, one per payer, each HOLD_AMOUNT
HOLD_AMOUNT = 500
HOLD_SECONDS = 3600  # far ahead: only age_holds, after the failover, makes them lapse
RELEASE_TIMEOUT_S = 60.0  # the worker looks every second
PROJECTION_TIMEOUT_S = 60.0  # svc_customer's relay, Kafka, svc_notify's consumer
NOTIFY_GROUPS = (GROUP_ID, TRANSFER_GROUP_ID)
GROUPS_JOIN_TIMEOUT_S = 90.0


def _with_environment(components: list[Component], environment: dict[str, str]) -> list[Component]:
    """The components, each started with this stack's settings in its environment (a process of
    the stack reads its settings from there, common/config.py), its own variables on top."""
    def env(own: Callable[[config.Settings], dict[str, str]]) -> Callable[[config.Settings], dict[str, str]]:
        return lambda s: {**environment, **own(s)}
    return [dataclasses.replace(c, env=env(c.env)) for c in components]


@pytest.fixture(scope="module")
def ha_bank(stack: Stack) -> Iterator[Stack]:
    """The second stack, started for this module and stopped after it, folder and all."""
    def components(settings: config.Settings, environment: dict[str, str]) -> list[Component]:
        # The default stack's Cassandra and Mailpit, on their own ports: reused, not started again.
        assert (settings.cassandra_port, settings.smtp_port, settings.mailpit_http_port) \
            == (stack.settings.cassandra_port, stack.settings.smtp_port, stack.settings.mailpit_http_port)
        chosen = [c for c in all_components(settings) if not c.name.startswith(NOT_STARTED)]
        return _with_environment(chosen, environment)

    # The cache holds Kafka's jars: downloaded once, for the default stack.
    with own_ha_stack("bank-failover-test-", PORTS, components, cache=stack.paths.cache) as (ha, started):
        assert not set(REUSED) & set(started), f"the default stack's {set(REUSED) & set(started)} not reused"
        # Ready once svc_notify's consumers are in their groups too: on a new Kafka their first
        # join meets no group coordinator yet (aiokafka logs it as an error), not a test's business.
        until(lambda: notify_consuming(ha.settings), "svc_notify's consumers in their groups", GROUPS_JOIN_TIMEOUT_S, 0.5)
        yield ha

    async def still_healthy(name: str) -> bool:
        return await stack.by_name[name].healthy(stack.settings)
    for name in REUSED:
        assert asyncio.run(still_healthy(name)), f"the default stack's {name} was stopped"


def notify_consuming(settings: config.Settings) -> bool | None:
    """True once each of svc_notify's consumers owns partitions and has polled them: its group's
    consumer_lag_records series (common/consumer.py) are on every process's /metrics."""
    for index in range(settings.processes("notify")):
        if not set(NOTIFY_GROUPS) <= set(lag_measured(settings, "notify", index)):
            return None
    return True


# --- the clients ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Party:
    account: Account
    token: str

    @property
    def account_id(self) -> str:
        return self.account.account_id


def send(settings: config.Settings, request: Request) -> None:
    """Sends the request until it is answered 200, or for REQUEST_DEADLINE_S."""
    send_with_retries(settings, request, lambda response: response.status == 200, REQUEST_DEADLINE_S, RETRY_PAUSE_S)


def send_each(settings: config.Settings, requests: list[Request]) -> None:
    for request in requests:
        send(settings, request)


class TransferLoad:
    """CLIENTS threads moving small amounts among the parties until stopped."""

    def __init__(self, settings: config.Settings, parties: list[Party], seed: int) -> None:
        self._settings = settings
        self._parties = parties
        self._seed = seed
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]
        self.requests: list[Request] = []
        self.crashes: list[BaseException] = []

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Each client finishes the request it is on (bounded by REQUEST_DEADLINE_S)."""
        self._stop.set()
        deadline = time.monotonic() + LOAD_STOP_TIMEOUT_S
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), "a client did not stop"

    def _client(self, index: int) -> None:
        rng = random.Random(self._seed * 100 + index)
        try:
            while not self._stop.is_set():  # until stop(), within the test's bounds
                source, target = rng.sample(self._parties, 2)
                request = Request("/v1/transfers", {
                    "request_id": uuid.uuid4().hex, "from_account_id": source.account_id,
                    "to_account_id": target.account_id, "amount": rng.randint(1, AMOUNT_MAX), "currency": "USD"},
                    source.token)
                self.requests.append(request)
                send(self._settings, request)
        except BaseException as exc:  # reported by the test: a client must not die silently
            self.crashes.append(exc)

    def acknowledged(self) -> int:
        return sum(1 for r in list(self.requests) if r.transfer_id is not None)

    def first_200_sent_after(self, t: float) -> float | None:
        """When the first 200 came for an attempt sent after t."""
        answers = [a.answered_s for r in list(self.requests) for a in list(r.attempts) if a.answer == "200" and a.sent_s > t]
        return min(answers, default=None)


async def open_parties(settings: config.Settings) -> tuple[list[Party], list[Request]]:
    """ACCOUNTS accounts in the ledger, each with FUNDS deposited by a teller through Envoy."""
    tokens = test_tokens(settings)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.transfer_grpc_port}") as channel:
        bank = Bank(settings, channel)
        accounts = [await bank.open_account() for _ in range(ACCOUNTS)]
    teller = tokens.teller()
    deposits = [Request("/v1/deposits", {"request_id": uuid.uuid4().hex, "account_id": a.account_id, "amount": FUNDS,
                                         "currency": "USD"}, teller) for a in accounts]
    for deposit in deposits:
        await asyncio.to_thread(send, settings, deposit)
        assert deposit.transfer_id is not None, f"a deposit was not made: {deposit.attempts[-3:]}"
    return [Party(a, tokens.customer(a.customer_id)) for a in accounts], deposits


async def place_holds(settings: config.Settings, parties: list[Party]) -> list[Request]:
    """HOLDS holds through Envoy, each of HOLD_AMOUNT from parties[i] to parties[HOLDS + i]."""
    holds = [Request("/v1/transfers", {
        "request_id": uuid.uuid4().hex, "from_account_id": payer.account_id, "to_account_id": payee.account_id,
        "amount": HOLD_AMOUNT, "currency": "USD", "hold_seconds": HOLD_SECONDS}, payer.token)
        for payer, payee in zip(parties[:HOLDS], parties[HOLDS:2 * HOLDS], strict=True)]
    for held in holds:
        await asyncio.to_thread(send, settings, held)
        assert held.transfer_id is not None, f"a hold was not placed: {held.attempts[-3:]}"
    return holds


async def held_by(settings: config.Settings, parties: list[Party]) -> dict[str, int]:
    """balance - available_balance of each party's account, as the ledger answers it: the sum of
    its PENDING holds as payer (API.md, "Holds")."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.transfer_grpc_port}") as channel:
        found = await Bank(settings, channel).available(*(p.account for p in parties))
    return {p.account_id: balance - available for p, (balance, available) in zip(parties, found, strict=True)}


def expired_holds(settings: config.Settings, hold_ids: list[str]) -> int:
    return sum(1 for row in transfer_rows(settings, hold_ids).values() if row.status == "EXPIRED")


def contact_email(settings: config.Settings, customer_id: str) -> str | None:
    """The address svc_notify's projection holds for the customer (None: not projected yet)."""
    rows = sql(settings, "SELECT email FROM notify.customer_contacts WHERE customer_id = %s", (customer_id,))
    return str(rows[0][0]) if rows else None


def log_ends(stack: Stack, service: str) -> dict[Path, int]:
    """Where the log of each of the service's processes ends now."""
    logs = [stack.paths.log(name) for name in stack.expand([service])]
    return {log: log.stat().st_size if log.exists() else 0 for log in logs}


def logged_since(ends: dict[Path, int]) -> list[dict[str, Any]]:
    """The records (common/logging.py: one JSON object a line) logged after `ends`; any other line
    but the launcher's own (a raw traceback, say) as a record of level UNSTRUCTURED."""
    records: list[dict[str, Any]] = []
    for log, end in ends.items():
        with log.open("rb") as file:
            file.seek(end)
            lines = file.read().decode(errors="replace").splitlines()
        for line in lines:
            try:
                records.append(dict(json.loads(line)))
            except ValueError:
                if line.strip() and not line.startswith("====="):
                    records.append({"level": "UNSTRUCTURED", "message": line})
    return records


# --- what a failover must leave ------------------------------------------------------------------

MONEY_MOVED = events_pb2.MoneyMoved.DESCRIPTOR.full_name
HOLD_EXPIRED = events_pb2.HoldExpired.DESCRIPTOR.full_name


async def transfer_events_on_kafka(settings: config.Settings) -> tuple[dict[str, Counter[str]], Counter[str]]:
    """How many MoneyMoved and HoldExpired records bank.transfer.v1 holds, from its beginning: per
    event type, per transfer id (the payload's; a hold's for HoldExpired), and per event id (the
    header's) of both."""
    by_transfer: dict[str, Counter[str]] = {MONEY_MOVED: Counter(), HOLD_EXPIRED: Counter()}
    by_event: Counter[str] = Counter()
    for record in await read_topic(settings, TRANSFER_TOPIC, timeout_s=KAFKA_READ_TIMEOUT_S):
        headers = {key: value.decode() for key, value in record.headers}
        event_type = headers.get("event_type", "")
        if event_type == MONEY_MOVED:
            event: events_pb2.MoneyMoved | events_pb2.HoldExpired = events_pb2.MoneyMoved.FromString(record.value or b"")
        elif event_type == HOLD_EXPIRED:
            event = events_pb2.HoldExpired.FromString(record.value or b"")
        else:
            continue
        assert event.event_id == headers.get("event_id"), (event.event_id, headers)
        by_transfer[event_type][event.transfer_id] += 1
        by_event[event.event_id] += 1
    return by_transfer, by_event


def unsent_events(settings: config.Settings) -> int:
    [(count,)] = sql(settings, "SELECT count(*) FROM transfer.outbox WHERE sent_time IS NULL")
    return int(count)


async def _failover(ha: Stack, kill: str, seed: int) -> None:
    settings = ha.settings
    await asyncio.to_thread(until, lambda: leader_with_sync_standby(settings), "a leader with a sync standby", 90, 0.5)
    notify_log_ends = log_ends(ha, "svc_notify")
    parties, deposits = await open_parties(settings)
    holds = await place_holds(settings, parties)
    hold_ids = [str(h.transfer_id) for h in holds]
    payers = parties[:HOLDS]  # place_holds: each pays one
    assert [str(h.body["from_account_id"]) for h in holds] == [p.account_id for p in payers]
    assert await held_by(settings, payers) == {payer.account_id: HOLD_AMOUNT for payer in payers}
    load = TransferLoad(settings, parties, seed)
    load.start()
    try:
        await asyncio.to_thread(until, lambda: True if load.acknowledged() >= ACKNOWLEDGED_BEFORE_KILL else None,
                                "transfers before the kill", 90)
        old, killed_at = await kill_the_leader(ha, kill)
        acknowledged_before = load.acknowledged()
        resumed_at = await asyncio.to_thread(until, lambda: load.first_200_sent_after(killed_at),
                                             "a 200 for a request sent after the kill", FAILOVER_WINDOW_MAX_S + 30)
        new = await asyncio.to_thread(until, lambda: n if (n := leader(settings)) not in (None, old) else None,
                                      "a new leader", 30, 0.5)
        rejoined = await back_as_replica(ha, old, kill, REJOIN_TIMEOUT_S)
        rejoined_at = time.monotonic()
        await asyncio.to_thread(until, lambda: load.first_200_sent_after(rejoined_at), "transfers after the rejoin", 30)
    finally:
        await asyncio.to_thread(load.stop)
    assert not load.crashes, f"a client crashed: {load.crashes[:3]}"

    requests = list(load.requests)
    acknowledged = [r for r in requests if r.transfer_id is not None]
    # A client that lost its answers sends again after the failover: the last requests the old
    # leader acknowledged, answered now by the new one with the transfer first made.
    originals = [r for r in acknowledged if r.attempts[-1].answered_s < killed_at][-REPLAYS:]
    replays = [Request(r.path, r.body, r.token) for r in originals]
    await asyncio.to_thread(send_each, settings, replays)
    replayed_otherwise = [(r.request_id, r.transfer_id, again.transfer_id, again.attempts[-1].answer)
                          for r, again in zip(originals, replays, strict=True) if again.transfer_id != r.transfer_id]
    unresolved = [r for r in requests if r.transfer_id is None]
    retried = [r for r in requests if len(r.attempts) > 1]
    answers = Counter(a.answer for r in [*requests, *replays] for a in r.attempts)
    window_answers = Counter(a.answer for r in requests for a in r.attempts if killed_at < a.sent_s < resumed_at)

    # The ledger, read on the leader (the multi-host conninfo lands there).
    rows = await asyncio.to_thread(sql, settings, "SELECT request_id, transfer_id::text, from_account_id::text,"
                                   " to_account_id::text, amount FROM transfer.transfers WHERE request_id = ANY(%s)",
                                   ([r.request_id for r in requests],))
    in_ledger: dict[str, list[tuple[str, str, str, int]]] = defaultdict(list)
    for request_id, transfer_id, source, target, amount in rows:
        in_ledger[request_id].append((transfer_id, source, target, amount))
    lost = [r.request_id for r in acknowledged
            if (r.transfer_id, r.body["from_account_id"], r.body["to_account_id"], r.body["amount"])
            not in in_ledger.get(r.request_id, [])]
    moved_twice = {request_id: len(found) for request_id, found in in_ledger.items() if len(found) > 1}
    balances = dict(await asyncio.to_thread(sql, settings, "SELECT account_id::text, balance FROM transfer.ledger_accounts"
                                            " WHERE account_id = ANY(%s::uuid[])", ([p.account_id for p in parties],)))
    expected = {p.account_id: FUNDS for p in parties}
    for r in acknowledged:
        expected[r.body["from_account_id"]] -= r.body["amount"]
        expected[r.body["to_account_id"]] += r.body["amount"]

    # The background workers, on the new leader: svc_notify's consumer projects a customer
    # registered now, and svc_transfer's release worker settles the holds lapsed now (the
    # multi-host conninfo of age_holds and of these reads lands on the leader).
    customer = await asyncio.to_thread(register, settings)
    registered_at = time.monotonic()
    aged = await asyncio.to_thread(age_holds, settings, hold_ids, HOLD_SECONDS)
    aged_at = time.monotonic()
    assert aged == HOLDS, f"holds PENDING until they were aged: {aged} of {HOLDS}"
    released_at = await asyncio.to_thread(
        until, lambda: time.monotonic() if expired_holds(settings, hold_ids) == HOLDS else None,
        "the aged holds EXPIRED", RELEASE_TIMEOUT_S, 0.2)
    still_held = {payer: held for payer, held in (await held_by(settings, payers)).items() if held != 0}
    await asyncio.to_thread(holds_invariants, settings,
                            [*(p.account_id for p in payers), *(str(h.body["to_account_id"]) for h in holds)])
    projected_email, projected_at = await asyncio.to_thread(
        until, lambda: (e, time.monotonic()) if (e := contact_email(settings, customer["customer_id"])) else None,
        "the registered customer in notify.customer_contacts", PROJECTION_TIMEOUT_S, 0.2)
    await asyncio.to_thread(wait_for_verification_code, settings, customer["email"], PROJECTION_TIMEOUT_S)
    mailed_at = time.monotonic()
    # svc_notify also reads every event of the load, whose customers it has no address of: no
    # email, and no error either.
    notify_records = logged_since(notify_log_ends)
    notify_errors = [r for r in notify_records if r.get("level") in ("ERROR", "CRITICAL", "UNSTRUCTURED")]
    no_contact = sum(1 for r in notify_records if r.get("outcome") == "no_contact")

    # The events: once the outbox is drained, each movement's MoneyMoved and each lapsed hold's
    # HoldExpired once on this stack's Kafka.
    await asyncio.to_thread(until, lambda: True if unsent_events(settings) == 0 else None,
                            "the outbox drained", OUTBOX_DRAIN_TIMEOUT_S, 0.5)
    by_type, by_event = await transfer_events_on_kafka(settings)
    by_transfer, by_hold = by_type[MONEY_MOVED], by_type[HOLD_EXPIRED]
    movements = [str(r.transfer_id) for r in [*deposits, *acknowledged]]
    missing = [t for t in movements if by_transfer[t] == 0]
    duplicated = {t: by_transfer[t] for t in movements if by_transfer[t] > 1}
    expired_missing = [h for h in hold_ids if by_hold[h] == 0]
    expired_duplicated = {h: by_hold[h] for h in hold_ids if by_hold[h] > 1}
    events_twice = sum(1 for count in by_event.values() if count > 1)

    figures.report(
        f"\nkill -9 of the leader's {kill} ({old}; new leader {new}): first 200 of a request sent after the kill "
        f"{resumed_at - killed_at:.1f}s after it; {old} back as {rejoined} {rejoined_at - killed_at:.1f}s after it\n"
        f"  answers by status (every attempt, replays too): {_table(answers)}\n"
        f"  ...of attempts sent between the kill and the first 200: {_table(window_answers)}\n"
        f"  requests {len(requests)}: acknowledged {len(acknowledged)} ({acknowledged_before} before the kill), "
        f"retried {len(retried)}, unresolved {len(unresolved)}; deposits {len(deposits)}; "
        f"sent again after the failover {len(replays)}, answered otherwise than the first time {len(replayed_otherwise)}\n"
        f"  ledger: acknowledged and missing {len(lost)}, request_ids that moved money twice {len(moved_twice)}, "
        f"balances sum {sum(balances.values())} (deposited {FUNDS * ACCOUNTS}), lowest {min(balances.values())}\n"
        f"  kafka: MoneyMoved of {len(movements)} acknowledged movements: missing {len(missing)}, "
        f"duplicated {len(duplicated)} ({sum(duplicated.values()) - len(duplicated)} extra records), "
        f"event_ids on the whole topic (this module's tests so far) more than once {events_twice}\n"
        f"  holds released after the failover: {HOLDS} of {HOLDS} EXPIRED {released_at - aged_at:.1f}s after they "
        f"were made to lapse, payers with their whole balance available again {HOLDS - len(still_held)} of {HOLDS}; "
        f"HoldExpired in Kafka: missing {len(expired_missing)}, duplicated {len(expired_duplicated)}\n"
        f"  customer registered after the failover: in svc_notify's contacts on the new leader "
        f"{projected_at - registered_at:.1f}s after its 200, verification email in Mailpit after "
        f"{mailed_at - registered_at:.1f}s; svc_notify during this test: events with nobody to email "
        f"{no_contact}, errors logged {len(notify_errors)}"
        + (f"\n  svc_notify's errors: {notify_errors[:3]}" if notify_errors else "")
        + (f"\n  duplicated (transfer_id: records): {dict(list(duplicated.items())[:10])}" if duplicated else "")
        + (f"\n  missing: {missing[:10]}" if missing else ""))

    assert not [a for a in answers if a.startswith("500")], f"answered 500: {_table(answers)}"
    # While there is no leader the bank answers 503 with its reason (svc_transfer's batches keep
    # a movement's whole wait below Envoy's route timeout): no gateway 504, no bare error.
    assert set(answers) <= {"200", "503 LEDGER_BUSY", "503 STORAGE_UNAVAILABLE"}, f"answers: {_table(answers)}"
    assert resumed_at - killed_at < FAILOVER_WINDOW_MAX_S
    assert not unresolved, f"requests never answered 200: {[(r.request_id, r.attempts[-3:]) for r in unresolved[:5]]}"
    assert len(replays) == REPLAYS and not replayed_otherwise, f"(request_id, first, again, answer): {replayed_otherwise[:5]}"
    assert not lost, f"acknowledged and not in the ledger: {lost[:10]}"
    assert not moved_twice, f"request_ids that moved money more than once: {dict(list(moved_twice.items())[:10])}"
    assert sum(balances.values()) == FUNDS * ACCOUNTS and min(balances.values()) >= 0
    assert balances == expected, "balances are not the deposits plus the acknowledged transfers"
    assert not missing, f"acknowledged movements with no MoneyMoved on Kafka: {missing[:10]}"
    assert not duplicated, f"acknowledged movements whose MoneyMoved is on Kafka more than once: {len(duplicated)}"
    assert not still_held, f"payers whose available balance is still below their balance: {still_held}"
    assert not expired_missing, f"lapsed holds with no HoldExpired on Kafka: {expired_missing}"
    assert not expired_duplicated, f"lapsed holds whose HoldExpired is on Kafka more than once: {expired_duplicated}"
    assert projected_email == customer["email"], (projected_email, customer["email"])
    assert not notify_errors, f"svc_notify logged errors: {notify_errors[:3]}"


def _table(counts: Counter[str]) -> str:
    return ", ".join(f"{answer} x{count}" for answer, count in sorted(counts.items())) or "none"


async def test_kill_9_of_the_leaders_postmaster_under_transfers_loses_nothing_and_moves_money_once(ha_bank: Stack) -> None:
    await _failover(ha_bank, "postmaster", seed=1)


async def test_kill_9_of_the_whole_leader_node_under_transfers_loses_nothing_and_moves_money_once(ha_bank: Stack) -> None:
    await _failover(ha_bank, "node", seed=2)

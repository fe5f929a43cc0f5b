"""The whole bank through a failover of its PostgreSQL (issue #19, point 4), as its clients see it.

A second bank stack in the HA mode, in a stack folder of its own with every port moved (PORTS), so
it runs beside the default stack the other tests use and leaves it alone: etcd, three Patroni
nodes, its own Redis and Kafka, Envoy, svc_customer, svc_account and svc_transfer with its usual
two processes (the outbox relay is one of them at a time, by an advisory lock the old leader takes
with it: across a failover either process may relay next, as in production). svc_account's
statements go to the default stack's Cassandra, which this stack's launcher reuses as it reuses any
healthy component it did not start, and `down` leaves running (checked at teardown). Nothing here
needs svc_notify, Mailpit, Prometheus or the web app: accounts are opened in the ledger with the
service token, and customers and a teller get tokens minted with this stack's keys (tests/tokens.py).

Under a transfer load through this stack's Envoy (REST, CLIENTS threads; each request sent again
with the same request_id after any answer but 200, or a connection error, until it gets its 200, as
an API client does) it kills the leader: (a) its postmaster, (b) the whole node (Patroni and its
postmaster; then starts it again, as a supervisor would). After each: every acknowledged transfer
is in the ledger (read on the HA leader), each request_id moved money exactly once, money is
conserved and no balance is negative, a request sent after the kill got a 200 within 30 s, nothing
was answered 500, the old leader is a replica again, and the MoneyMoved event of every acknowledged
movement is on this stack's Kafka exactly once. Margins are wide: these machines are noisy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from bank.events.v1 import events_pb2

from common import config
from common.events import TOPICS, TRANSFER_TOPIC
from devstack.components import SERVICES, Component, all_components
from devstack.stack import Stack
from tests import figures
from tests.ha_support import (
    REPLICA_ROLES,
    data_directory,
    kill_node,
    kill_orphan_postmasters,
    leader,
    leader_with_sync_standby,
    roles,
    whole_cluster,
)
from tests.ledger_support import Bank, sql
from tests.support import rest, until
from tests.tokens import test_tokens

# Every port of the second stack (all moved, even those of what it leaves out): away from the
# default stack's and from tests/test_ha.py's cluster (12379, 15432-15435, 18008-18011), and below
# the kernel's ephemeral range (32768 and up), where an outgoing connection could take one first.
# The services' private ports are these + 100 * (i + 1).
GRPC_PORTS = {name: 31051 + i for i, name in enumerate(SERVICES)}
PORTS = {
    "BANK_ETCD_PORT": "22379", "BANK_PG_PORT": "25432", "BANK_PATRONI_PORT": "28008", "BANK_REDIS_PORT": "26379",
    "BANK_KAFKA_BOOTSTRAP": "127.0.0.1:29092", "BANK_KAFKA_CONTROLLER_PORT": "29093",
    "BANK_ENVOY_PORT": "28080", "BANK_ENVOY_ADMIN_PORT": "29901", "BANK_ENVOY_TLS_PORT": "28443",
    "BANK_WEB_PORT": "28070", "BANK_PROMETHEUS_PORT": "29090", "BANK_MAILPIT_HTTP_PORT": "28025", "BANK_SMTP_PORT": "21025",
    **{f"BANK_{name.upper()}_GRPC_PORT": str(port) for name, port in GRPC_PORTS.items()},
    **{f"BANK_{name.upper()}_ADDR": f"127.0.0.1:{port}" for name, port in GRPC_PORTS.items()},
    **{f"BANK_{name.upper()}_METRICS_PORT": str(29101 + i) for i, name in enumerate(SERVICES)},
}
# What of all_components this stack leaves out: nothing it runs needs them (Envoy's routes to the
# web app and svc_notify have no client here).
NOT_STARTED = ("mailpit", "web", "prometheus", "svc_notify")

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


def _with_environment(components: list[Component], environment: dict[str, str]) -> list[Component]:
    """The components, each started with this stack's settings in its environment (a process of
    the stack reads its settings from there, common/config.py), its own variables on top."""
    def env(own: Callable[[config.Settings], dict[str, str]]) -> Callable[[config.Settings], dict[str, str]]:
        return lambda s: {**environment, **own(s)}
    return [dataclasses.replace(c, env=env(c.env)) for c in components]


@pytest.fixture(scope="module")
def ha_bank(stack: Stack) -> Iterator[Stack]:
    """The second stack, started for this module and stopped after it, folder and all."""
    # Below /tmp, open to others: the nodes run as the postgres user and must reach their folders.
    root = Path(tempfile.mkdtemp(prefix="bank-failover-test-", dir="/tmp"))
    root.chmod(0o755)
    (root / "cache").symlink_to(stack.paths.cache)  # Kafka's jars: downloaded once, for the default stack
    environment = dict(PORTS, BANK_STACK_DIR=str(root), BANK_PG_NODES="3", BANK_ETCD_MEMBERS="1")
    settings = config.load(dict(os.environ, **environment))
    assert settings.cassandra_port == stack.settings.cassandra_port
    components = [c for c in all_components(settings) if not c.name.startswith(NOT_STARTED)]
    ha = Stack(settings, _with_environment(components, environment))
    try:
        started = asyncio.run(ha.up(out=sys.stderr))
        assert "cassandra" not in started, "the default stack's Cassandra was not reused"
        yield ha
    finally:
        ha.down(out=sys.stderr)
        kill_orphan_postmasters(ha)
        shutil.rmtree(root, ignore_errors=True)
    cassandra = stack.by_name["cassandra"]

    async def still_healthy() -> bool:
        return await cassandra.healthy(stack.settings)
    assert asyncio.run(still_healthy()), "the default stack's Cassandra was stopped"


# --- the clients ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Party:
    account_id: str
    token: str


@dataclass(frozen=True)
class Attempt:
    sent_s: float  # time.monotonic()
    answered_s: float
    answer: str  # "200", "503 STORAGE_UNAVAILABLE", "504", or the connection error's type


@dataclass
class Request:
    """One logical request; every retry sends exactly this (same request_id, same body)."""
    path: str
    body: dict[str, Any]
    token: str
    attempts: list[Attempt] = field(default_factory=list)
    transfer_id: str | None = None  # of the 200

    @property
    def request_id(self) -> str:
        return str(self.body["request_id"])


def send(settings: config.Settings, request: Request) -> None:
    """Sends the request until it is answered 200, or for REQUEST_DEADLINE_S."""
    deadline = time.monotonic() + REQUEST_DEADLINE_S
    while True:
        sent_s = time.monotonic()
        try:
            response = rest(settings, "POST", request.path, request.body, token=request.token)
            answer = f"{response.status} {response.reason or ''}".strip()
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out: outcome unknown
            response, answer = None, type(exc).__name__
        request.attempts.append(Attempt(sent_s, time.monotonic(), answer))
        if response is not None and response.status == 200:
            request.transfer_id = str(response.body["transfer_id"])
            return
        if time.monotonic() > deadline:
            return
        time.sleep(RETRY_PAUSE_S)


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
    return [Party(a.account_id, tokens.customer(a.customer_id)) for a in accounts], deposits


# --- what a failover must leave ------------------------------------------------------------------

async def money_moved_on_kafka(settings: config.Settings) -> tuple[Counter[str], Counter[str]]:
    """How many MoneyMoved records bank.transfer.v1 holds, from its beginning, per transfer id (the
    payload's) and per event id (the header's), read by a fresh consumer of no group."""
    partitions = [TopicPartition(TRANSFER_TOPIC, p) for p in range(TOPICS[TRANSFER_TOPIC])]
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                                isolation_level="read_committed", request_timeout_ms=30_000)
    by_transfer: Counter[str] = Counter()
    by_event: Counter[str] = Counter()
    await consumer.start()
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        deadline = time.monotonic() + KAFKA_READ_TIMEOUT_S
        while any([await consumer.position(tp) < end[tp] for tp in partitions]):
            assert time.monotonic() < deadline, f"{TRANSFER_TOPIC} not read to its end in {KAFKA_READ_TIMEOUT_S:.0f}s"
            for records in (await consumer.getmany(*partitions, timeout_ms=1000, max_records=5000)).values():
                for record in records:
                    headers = {key: value.decode() for key, value in record.headers}
                    if headers.get("event_type") != events_pb2.MoneyMoved.DESCRIPTOR.full_name:
                        continue
                    event = events_pb2.MoneyMoved.FromString(record.value or b"")
                    assert event.event_id == headers.get("event_id"), (event.event_id, headers)
                    by_transfer[event.transfer_id] += 1
                    by_event[event.event_id] += 1
    finally:
        await consumer.stop()
    return by_transfer, by_event


def unsent_events(settings: config.Settings) -> int:
    [(count,)] = sql(settings, "SELECT count(*) FROM transfer.outbox WHERE sent_time IS NULL")
    return int(count)


async def _failover(ha: Stack, kill: str, seed: int) -> None:
    settings = ha.settings
    await asyncio.to_thread(until, lambda: leader_with_sync_standby(settings), "a leader with a sync standby", 90, 0.5)
    parties, deposits = await open_parties(settings)
    load = TransferLoad(settings, parties, seed)
    load.start()
    try:
        await asyncio.to_thread(until, lambda: True if load.acknowledged() >= ACKNOWLEDGED_BEFORE_KILL else None,
                                "transfers before the kill", 90)
        old = await asyncio.to_thread(until, lambda: whole_cluster(settings), "the whole cluster, settled", 90, 0.5)
        data_dir = await asyncio.to_thread(data_directory, settings, old)
        acknowledged_before = load.acknowledged()
        killed_at = time.monotonic()
        kill_node(ha, old, data_dir, kill)
        resumed_at = await asyncio.to_thread(until, lambda: load.first_200_sent_after(killed_at),
                                             "a 200 for a request sent after the kill", FAILOVER_WINDOW_MAX_S + 30)
        new = await asyncio.to_thread(until, lambda: n if (n := leader(settings)) not in (None, old) else None,
                                      "a new leader", 30, 0.5)
        if kill == "node":  # its launcher starts it again, as `make up` (or a supervisor) would
            await ha.up([old], out=sys.stderr)
        rejoined = await asyncio.to_thread(until, lambda: r if (r := roles(settings).get(old)) in REPLICA_ROLES else None,
                                           f"{old} back as a replica", REJOIN_TIMEOUT_S, 0.5)
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

    # The events: once the outbox is drained, each movement's MoneyMoved once on this stack's Kafka.
    await asyncio.to_thread(until, lambda: True if unsent_events(settings) == 0 else None,
                            "the outbox drained", OUTBOX_DRAIN_TIMEOUT_S, 0.5)
    by_transfer, by_event = await money_moved_on_kafka(settings)
    movements = [str(r.transfer_id) for r in [*deposits, *acknowledged]]
    missing = [t for t in movements if by_transfer[t] == 0]
    duplicated = {t: by_transfer[t] for t in movements if by_transfer[t] > 1}
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
        f"event_ids on the whole topic (this module's tests so far) more than once {events_twice}"
        + (f"\n  duplicated (transfer_id: records): {dict(list(duplicated.items())[:10])}" if duplicated else "")
        + (f"\n  missing: {missing[:10]}" if missing else ""))

    assert not [a for a in answers if a.startswith("500")], f"answered 500: {_table(answers)}"
    assert resumed_at - killed_at < FAILOVER_WINDOW_MAX_S
    assert not unresolved, f"requests never answered 200: {[(r.request_id, r.attempts[-3:]) for r in unresolved[:5]]}"
    assert len(replays) == REPLAYS and not replayed_otherwise, f"(request_id, first, again, answer): {replayed_otherwise[:5]}"
    assert not lost, f"acknowledged and not in the ledger: {lost[:10]}"
    assert not moved_twice, f"request_ids that moved money more than once: {dict(list(moved_twice.items())[:10])}"
    assert sum(balances.values()) == FUNDS * ACCOUNTS and min(balances.values()) >= 0
    assert balances == expected, "balances are not the deposits plus the acknowledged transfers"
    assert not missing, f"acknowledged movements with no MoneyMoved on Kafka: {missing[:10]}"
    assert not duplicated, f"acknowledged movements whose MoneyMoved is on Kafka more than once: {len(duplicated)}"


def _table(counts: Counter[str]) -> str:
    return ", ".join(f"{answer} x{count}" for answer, count in sorted(counts.items())) or "none"


async def test_kill_9_of_the_leaders_postmaster_under_transfers_loses_nothing_and_moves_money_once(ha_bank: Stack) -> None:
    await _failover(ha_bank, "postmaster", seed=1)


async def test_kill_9_of_the_whole_leader_node_under_transfers_loses_nothing_and_moves_money_once(ha_bank: Stack) -> None:
    await _failover(ha_bank, "node", seed=2)

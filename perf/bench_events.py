"""Benchmarks of the asynchronous half, three modes:

  latency (the default, `make bench-events`): end-to-end lag from a committed transfer to (1) its
      line in the receiver's statement (ListAccountActivity, svc_account's Cassandra projection)
      and (2) the receiver's email in Mailpit (svc_notify), p50/p99, under a steady background
      load of transfers.
  ceiling: Mailpit's own intake, messages/s, from persistent smtplib connections (1, 4 and 16 at
      once; the best is the ceiling svc_notify is compared with).
  drain: a backlog of real transfers between real customers, made while svc_notify and
      svc_account are stopped; then each is started alone and its drain rate measured (emails/s
      accepted by Mailpit, statement events/s handled), with the CPU each process used.
      `python -m perf.bench_events drain --transfers 3000`. Stops and starts those two services.

The clock starts when CreateTransfer returns (the ledger has committed by then), so a lag is the
relay's wake-up + Kafka + the consumer + Cassandra or SMTP + this poller's interval (POLL_S).
Run against the local stack (`make up` first) with `make bench-events`; loopback only. Bounded:
a fixed number of samples, each given at most SAMPLE_TIMEOUT_S. Writes JSON to
perf/results/events-<time>.json (drain-<time>.json, ceiling-<time>.json) and prints it.

Mailpit's search slows down with the number of messages it holds (measured: 3 ms empty, 270 ms
at 100,000), and this poller searches it every POLL_S: for comparable numbers empty it first
(`curl -X DELETE http://127.0.0.1:8025/api/v1/messages`; the local sink only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import smtplib
import statistics
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import config
from common.config import REPO_ROOT
from common.events import TOPICS, TRANSFER_TOPIC
from devstack import proc
from devstack.stack import Stack
from tests.events_support import Holder, deposit, holder, lag_measured, mailpit_stats, service_metric, teller_token
from tests.support import mail_count, rest

RESULTS = REPO_ROOT / "perf" / "results"
POLL_S = 0.005
SAMPLE_TIMEOUT_S = 30.0
FUNDS = 10_000_000


def _transfer(settings: config.Settings, source: Holder, target: Holder, amount: int) -> str:
    response = rest(settings, "POST", "/v1/transfers", {
        "request_id": uuid.uuid4().hex, "from_account_id": source.account_id, "to_account_id": target.account_id,
        "amount": amount, "currency": "USD"}, token=source.token)
    if response.status != 200:
        raise RuntimeError(f"transfer refused: {response.status} {response.body}")
    return str(response.body["transfer_id"])


def _newest_line(settings: config.Settings, person: Holder) -> str:
    response = rest(settings, "GET", f"/v1/accounts/{person.account_id}/activity?page_size=1", token=person.token)
    lines = response.body.get("activities", []) if response.status == 200 else []
    return str(lines[0]["transfer_id"]) if lines else ""


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)
    return {"count": len(ordered), "p50_ms": pick(0.50), "p99_ms": pick(0.99), "max_ms": round(ordered[-1], 1),
            "mean_ms": round(statistics.fmean(ordered), 1)}


class Background:
    """Transfers back and forth between two other customers at a fixed rate: the 'normal load'."""

    def __init__(self, settings: config.Settings, pair: tuple[Holder, Holder], rate_per_s: float) -> None:
        self._settings, self._pair, self._pause_s = settings, pair, 1.0 / rate_per_s if rate_per_s > 0 else 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.sent = 0

    def _run(self) -> None:
        if self._pause_s == 0:
            return
        n = 0
        while not self._stop.wait(self._pause_s):
            source, target = (self._pair if n % 2 == 0 else self._pair[::-1])
            n += 1
            try:
                _transfer(self._settings, source, target, 1)
                self.sent += 1
            except (RuntimeError, OSError):
                pass

    def __enter__(self) -> Background:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def latency(settings: config.Settings, args: argparse.Namespace) -> dict[str, Any]:
    teller = teller_token(settings)
    sender, receiver, load_a, load_b = (holder(settings) for _ in range(4))
    for person in (sender, load_a, load_b):
        deposit(settings, teller, person.account_id, FUNDS)
    time.sleep(1.0)  # let the deposits' own emails and lines settle before sampling

    statement_ms: list[float] = []
    email_ms: list[float] = []
    missed = {"statement": 0, "email": 0}
    with Background(settings, (load_a, load_b), args.background_rate) as background:
        started = time.perf_counter()
        for _ in range(args.samples):
            mails_before = mail_count(settings, receiver.email)
            transfer_id = _transfer(settings, sender, receiver, 1)
            committed = time.perf_counter()
            line_at = mail_at = None
            while (line_at is None or mail_at is None) and time.perf_counter() - committed < SAMPLE_TIMEOUT_S:
                if line_at is None and _newest_line(settings, receiver) == transfer_id:
                    line_at = time.perf_counter()
                if mail_at is None and mail_count(settings, receiver.email) > mails_before:
                    mail_at = time.perf_counter()
                time.sleep(POLL_S)
            if line_at is None:
                missed["statement"] += 1
            else:
                statement_ms.append((line_at - committed) * 1000)
            if mail_at is None:
                missed["email"] += 1
            else:
                email_ms.append((mail_at - committed) * 1000)
        elapsed_s = time.perf_counter() - started
    results: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "samples": args.samples,
        "background_transfers_per_s": round(background.sent / elapsed_s, 1),
        "commit_to_statement_line": _percentiles(statement_ms),
        "commit_to_email_in_mailpit": _percentiles(email_ms),
        "missed_within_s": {"timeout_s": SAMPLE_TIMEOUT_S, **missed},
        "poll_interval_ms": POLL_S * 1000,
    }
    return results




# --- Mailpit, metrics and processes: what the drain and the sustained benchmark read -------------

def empty_mailpit(settings: config.Settings) -> None:
    """Delete every message of the local sink: its intake and search slow down as it fills."""
    request = urllib.request.Request(f"http://127.0.0.1:{settings.mailpit_http_port}/api/v1/messages", method="DELETE")
    with urllib.request.urlopen(request, timeout=60):  # noqa: S310  # an http:// URL of our own
        pass


def group_cpu_s(stack: Stack, names: list[str]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each component's processes (its process group)."""
    tick = os.sysconf("SC_CLK_TCK")
    groups: dict[int, str] = {}
    for name in stack.expand(names):
        record = proc.read_pidfile(stack.pidfile(name))
        if record is not None:
            groups[record.pid] = name.split("-")[0]
    used = dict.fromkeys({g for g in groups.values()}, 0.0)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields_ = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        group = groups.get(int(fields_[2]))  # pgrp
        if group is not None:
            used[group] += (int(fields_[11]) + int(fields_[12])) / tick  # utime, stime
    return used


# --- ceiling: Mailpit's own intake ---------------------------------------------------------------

CEILING_TEXT = ("You received 12.34 USD in account 0192f0c4-7f3e-7b1a-9c1e-0a1b2c3d4e5f from account"
                " 0192f0c4-7f3e-7b1a-9c1e-0a1b2c3d4e60.\nBalance after: 1234.56 USD\n"
                "Reference: 0192f0c4-7f3e-7b1a-9c1e-0a1b2c3d4e61\n\nSimple Bank\n")


def _ceiling_connection(settings: config.Settings, messages: int, tag: str) -> None:
    """One persistent SMTP connection sending `messages` emails the size of the bank's."""
    with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=10) as smtp:
        for n in range(messages):
            body = (f"From: Simple Bank <no-reply@simplebank.local>\r\nTo: ceiling-{tag}@example.com\r\n"
                    f"Subject: You received 12.34 USD\r\nMessage-ID: <ceiling-{tag}-{n}@simplebank.local>\r\n"
                    "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=\"utf-8\"\r\n"
                    f"Content-Transfer-Encoding: 7bit\r\n\r\n{CEILING_TEXT}").replace("\n", "\r\n").replace("\r\r", "\r")
            smtp.sendmail("no-reply@simplebank.local", [f"ceiling-{tag}@example.com"], body.encode())


def mailpit_ceiling(settings: config.Settings, messages: int = 2000,
                    connections: tuple[int, ...] = (1, 4, 16)) -> dict[str, Any]:
    """Messages/s Mailpit accepts from n persistent connections at once, for each n; the best is
    the ceiling. Mailpit is emptied before each measurement."""
    rates: dict[str, float] = {}
    for count in connections:
        empty_mailpit(settings)
        per_connection = max(1, messages // count)
        run = uuid.uuid4().hex[:8]
        started = time.perf_counter()
        with ThreadPoolExecutor(count) as pool:
            for future in [pool.submit(_ceiling_connection, settings, per_connection, f"{run}-{i}") for i in range(count)]:
                future.result()
        rates[str(count)] = round(per_connection * count / (time.perf_counter() - started), 1)
    empty_mailpit(settings)
    return {"messages_per_s_by_connections": rates, "ceiling_messages_per_s": max(rates.values())}


# --- drain: a backlog made while the consumers are stopped ----------------------------------------

DRAIN_TIMEOUT_S = 300.0


def people(settings: config.Settings, count: int, funds: int) -> list[Holder]:
    """count real customers (registered, verified, logged in), each with a funded USD account."""
    teller = teller_token(settings)
    with ThreadPoolExecutor(min(8, count)) as pool:
        found = list(pool.map(lambda _: holder(settings), range(count)))
        list(pool.map(lambda person: deposit(settings, teller, person.account_id, funds), found))
    return found


def _lag_known(settings: config.Settings) -> bool:
    """Whether every consumer group of the transfer topic has measured the lag of every partition:
    a consumer that has just started has measured none, and its lag then reads 0."""
    for service in ("account", "notify"):
        measured: dict[str, set[tuple[str, str]]] = {}
        for index in range(settings.processes(service)):
            for group, partitions in lag_measured(settings, service, index).items():
                measured.setdefault(group, set()).update(p for p in partitions if p[0] == TRANSFER_TOPIC)
        transfer_groups = [partitions for partitions in measured.values() if partitions]
        if not transfer_groups or any(len(partitions) < TOPICS[TRANSFER_TOPIC] for partitions in transfer_groups):
            return False
    return True


def wait_caught_up(settings: config.Settings, timeout_s: float = 120.0) -> None:
    """Until the relay has published everything and both consumers' groups have no lag."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        backlog = service_metric(settings, "transfer", "outbox_backlog")
        lag = sum(service_metric(settings, service, "consumer_lag_records") for service in ("account", "notify"))
        if backlog == 0 and lag == 0 and _lag_known(settings):
            return
        time.sleep(0.5)
    raise RuntimeError(f"the consumers did not catch up within {timeout_s}s")


def make_transfers(settings: config.Settings, crowd: list[Holder], count: int, concurrency: int = 16) -> int:
    """count transfers of 1 between random pairs of the crowd, concurrency at a time; the committed ones."""
    rng = random.Random(11)  # noqa: S311  # load-test data, not secrets
    pairs = [tuple(rng.sample(crowd, 2)) for _ in range(count)]

    def one(pair: tuple[Holder, ...]) -> bool:
        try:
            _transfer(settings, pair[0], pair[1], 1)
            return True
        except (RuntimeError, OSError):
            return False
    with ThreadPoolExecutor(concurrency) as pool:
        return sum(pool.map(one, pairs))


def _drain_one(stack: Stack, settings: config.Settings, service: str, done: Callable[[], int],
               expected: int) -> dict[str, Any]:
    """Start the service and time it through the backlog: from its first unit done to the last."""
    component = f"svc_{service}"
    cpu_names = [component, "cassandra", "mailpit", "kafka", "postgres"]
    asyncio.run(stack.up([component]))
    cpu_before, wall_before = group_cpu_s(stack, cpu_names), time.perf_counter()
    first_at: float | None = None
    last = 0
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        last = done()
        now = time.perf_counter()
        if first_at is None and last > 0:
            first_at = now
        if last >= expected:
            break
        time.sleep(0.05)
    finished_at = time.perf_counter()
    cpu_after = group_cpu_s(stack, cpu_names)
    wall = finished_at - wall_before
    span = finished_at - (first_at or finished_at)
    return {"expected": expected, "done": last, "complete": last >= expected,
            "per_s": round(last / span, 1) if span > 0 else None, "drain_s": round(span, 2),
            "cpu_cores_used": {name: round((cpu_after[name] - cpu_before.get(name, 0.0)) / wall, 2)
                               for name in cpu_after}}


def drain(settings: config.Settings, args: argparse.Namespace) -> dict[str, Any]:
    stack = Stack(settings)
    empty_mailpit(settings)  # its search (the verification codes) slows down as it fills
    crowd = people(settings, args.people, FUNDS)
    wait_caught_up(settings)
    ceiling = mailpit_ceiling(settings, args.ceiling_messages) if args.ceiling_messages else None
    stack.down(["svc_notify", "svc_account"])
    try:
        started = time.perf_counter()
        committed = make_transfers(settings, crowd, args.transfers)
        made_s = time.perf_counter() - started
        print(f"{committed} transfers committed in {made_s:.1f} s with svc_notify and svc_account stopped",
              file=sys.stderr)
        empty_mailpit(settings)
        accepted_before = mailpit_stats(settings)["SMTPAccepted"]
        emails = _drain_one(stack, settings, "notify", lambda: mailpit_stats(settings)["SMTPAccepted"] - accepted_before,
                            2 * committed)
        print(f"emails: {emails}", file=sys.stderr)
        statements = _drain_one(stack, settings, "account", lambda: int(service_metric(
            settings, "account", "consumer_events_total", group="svc_account", outcome="applied")), committed)
        print(f"statement events: {statements}", file=sys.stderr)
    finally:
        asyncio.run(stack.up(["svc_notify", "svc_account"]))
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "people": args.people,
            "transfers_committed": committed, "notify_processes": settings.processes("notify"),
            "account_processes": settings.processes("account"), "mailpit": ceiling,
            "emails": emails, "statement_events": statements,
            "emails_share_of_mailpit_ceiling": (round(emails["per_s"] / ceiling["ceiling_messages_per_s"], 3)
                                                if ceiling and emails["per_s"] else None)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="latency", choices=["latency", "ceiling", "drain"])
    parser.add_argument("--samples", type=int, default=200, help="latency: probe transfers")
    parser.add_argument("--background-rate", type=float, default=50.0, help="latency: background transfers per second")
    parser.add_argument("--transfers", type=int, default=3000, help="drain: transfers in the backlog")
    parser.add_argument("--people", type=int, default=10, help="drain: customers the transfers are between")
    parser.add_argument("--ceiling-messages", type=int, default=2000,
                        help="ceiling, drain: messages per Mailpit measurement (drain: 0 skips it)")
    args = parser.parse_args()
    if not 1 <= args.samples <= 10_000 or not 0 <= args.background_rate <= 1000:
        parser.error("samples must be 1..10000 and background-rate 0..1000")
    if not 1 <= args.transfers <= 50_000 or not 2 <= args.people <= 1000 or not 0 <= args.ceiling_messages <= 50_000:
        parser.error("transfers must be 1..50000, people 2..1000, ceiling-messages 0..50000")
    settings = config.load()
    if args.mode == "latency":
        results = latency(settings, args)
    elif args.mode == "ceiling":
        results = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "mailpit": mailpit_ceiling(settings, args.ceiling_messages or 2000)}
    else:
        results = drain(settings, args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = {"latency": "events"}.get(args.mode, args.mode)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

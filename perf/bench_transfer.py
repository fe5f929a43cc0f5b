"""Benchmark of the money-movement hot path: CreateTransfer, end to end, against the running
local stack, next to its ceiling (the same SQL function driven by pgbench).

Paths, each at 16 and 64 clients, over two account distributions (uniform: 10,000 accounts;
hot: 10 accounts, so most movements queue on the same row locks):
  grpc-direct  ghz -> svc_transfer's port (its processes share it)
  grpc-envoy   ghz -> Envoy :8080 -> svc_transfer
  rest-envoy   k6  -> Envoy :8080 (JSON transcoding) -> svc_transfer
  pgbench      pgbench -> Postgres, `SET LOCAL statement_timeout …\\; SELECT transfer.move_money_batch(…)`
               with one movement per transaction: the function svc_transfer calls, without gRPC,
               auth, Python, the pool or group commit (svc_transfer sends many movements per call
               when they queue)
  ceiling      pgbench -> Postgres, perf/ceiling/ceiling.sql (a copy of ../shared/perf's): the same
               transfer written as plain SQL in a scratch schema "ceiling" of the same database,
               one per transaction. THE yardstick: every other figure is reported as a share of it
               (the ratio to the ceiling of the same distribution and client count, same run).
  pgbench-holds     pgbench -> Postgres, holds (#18) through the same function: a placement (a TRANSFER
                    with p_hold_seconds), then a POST of it, or a VOID one time in ten; two
                    transactions, as two requests would be. Unit: place+settle pairs/s
  rest-envoy-holds  k6 -> Envoy: POST /v1/transfers with hold_seconds, then :post (or :void, 10%) by
                    the payee. Unit: pairs/s
  A holds row is also given as a ratio to its path's plain transfers/s of the same run
  (pgbench-holds to pgbench, rest-envoy-holds to rest-envoy; #18's target: at least 0.5).

Every request is a new movement of 1 JPY (a new request_id) between two different accounts of
one bench customer, all funded generously: no business refusal is expected, so any error counts.
That customer owns both sides of every hold, so it is the payee that posts or voids it.
The bench's accounts and movements stay in the ledger (JPY, ids under a per-run prefix).

    make bench-transfer   (or: .venv/bin/python -m perf.bench_transfer [--duration-s 10] [--clients 16,64]
                           [--paths grpc-direct,pgbench] [--pause-consumers])

`make bench-transfer` pauses svc_account and svc_notify for the runs (--pause-consumers): their
consumers turn each movement into statement lines and emails as it happens, which takes about
one of the two cores from the path being measured and from pgbench alike (`make bench-events`
measures that half). Without the flag, the numbers are those of the whole stack at once. With
it, the bench starts them again at the end and waits (DRAIN_TIMEOUT_S at most) until they have
handled the backlog the runs left, so the next sitting, or `make test`, finds the stack idle.

Needs the stack up (`make up`), ghz and k6 (`make tools`; without k6 the REST runs are skipped). Writes perf/results/transfer-<time>.json
and .png (and transfer-latest.*). 2 CPU cores: the load generators compete with what they load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import socket
import statistics
import string
import subprocess
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from common import config
from common.ids import new_id
from devstack.stack import Stack
from perf.bench_events import wait_caught_up
from tests.tokens import test_tokens

REPO = Path(__file__).resolve().parent.parent

RESULTS = REPO / "perf" / "results"
BIN = Path(config.load().stack_dir) / "bin"
CURRENCY = "JPY"
FUNDING = 10**12  # per account: transfers of 1 never run short
UNIFORM_ACCOUNTS = 10_000
HOT_ACCOUNTS = 10
FUNDING_BATCH = 256  # deposits per move_money_batch call, its maximum
PAIRS = 20_000  # pre-drawn (from, to) pairs the load generators cycle through
RUN_TIMEOUT_S = 120
# Holds paths and the plain path of the same stack each is compared with (#18: ratio >= 0.5).
HOLDS_OF = {"pgbench-holds": "pgbench", "rest-envoy-holds": "rest-envoy"}
PATHS = ("ceiling", "grpc-direct", "grpc-envoy", "rest-envoy", "rest-envoy-holds", "pgbench", "pgbench-holds")
# The services whose Kafka consumers turn every movement into statement lines and emails.
CONSUMERS = ["svc_account", "svc_notify"]
# A full run leaves the paused consumers some 150,000 events; they handle a few hundred a second.
DRAIN_TIMEOUT_S = 900.0


@dataclass
class Result:
    path: str
    distribution: str
    clients: int
    duration_s: float
    requests: int = 0
    errors: int = 0
    rps: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)  # p50, p95, p99, mean
    error_kinds: dict[str, int] = field(default_factory=dict)
    note: str = ""
    share_of_ceiling: float | None = None  # rps / the ceiling's rps, same distribution and clients
    unit: str = "movements/s"  # what rps counts: holds paths count place+settle pairs
    # Holds paths: rps / the same path's plain transfers/s (HOLDS_OF), same distribution and clients.
    ratio_to_transfers: float | None = None
    # Where the CPU went during the run: ms of CPU per request, by process group (cpu_groups).
    cpu_ms_per_request: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Bench:
    settings: config.Settings
    prefix: str  # first 8 hex digits of every bench account id
    owner_id: str
    token: str
    duration_s: int
    workdir: Path

    def account_id(self, index: int) -> str:
        return f"{self.prefix}-0000-4000-8000-{index:012d}"

    def pairs_file(self, distribution: str) -> Path:
        return self.workdir / f"pairs-{distribution}.json"


# --- setup -----------------------------------------------------------------------------------

def leader_port(settings: config.Settings) -> int:
    """The port pgbench must use: the one server's, or in HA mode the current leader's, found as the
    services find it (the multi-host conninfo keeps the node that takes writes). Asked at each
    pgbench start, so a failover between runs is followed rather than measured as refusals."""
    if not settings.pg_ha:
        return settings.pg_port
    with psycopg.connect(settings.pg_conninfo, autocommit=True) as conn:
        row = conn.execute("SELECT inet_server_port()").fetchone()
    assert row is not None and row[0] is not None, "the leader answered without a port"
    return int(row[0])


def check_stack(settings: config.Settings) -> None:
    for name, port in (("svc_transfer", settings.transfer_grpc_port), ("envoy", settings.envoy_port),
                       ("postgres", leader_port(settings))):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except OSError as exc:
            raise SystemExit(f"{name} is not listening on 127.0.0.1:{port}; start the stack with `make up`") from exc


def open_accounts(bench: Bench, count: int, offset: int) -> None:
    """Opens and funds the bench's ledger accounts with the ledger's own functions, in one go."""
    ids = [bench.account_id(offset + i) for i in range(count)]
    with psycopg.connect(bench.settings.pg_conninfo, autocommit=True) as conn:
        conn.execute("SET statement_timeout = '120s'")
        errors = conn.execute(
            "SELECT count(*) FILTER (WHERE (transfer.open_ledger_account(a, %s::uuid, %s)).error IS NOT NULL)"
            " FROM unnest(%s::uuid[]) AS a", (bench.owner_id, CURRENCY, ids)).fetchone()
        assert errors == (0,), errors
        for chunk in range(0, len(ids), FUNDING_BATCH):
            batch = ids[chunk:chunk + FUNDING_BATCH]
            errors = conn.execute(
                "SELECT count(*) FILTER (WHERE error IS NOT NULL) FROM transfer.move_money_batch("
                " array_fill('teller:bench'::text, ARRAY[%(n)s]), %(request_ids)s::text[],"
                " array_fill('DEPOSIT'::text, ARRAY[%(n)s]), array_fill(NULL::uuid, ARRAY[%(n)s]),"
                " array_fill(NULL::uuid, ARRAY[%(n)s]), %(ids)s::uuid[], array_fill(%(amount)s::bigint, ARRAY[%(n)s]),"
                " array_fill(%(currency)s::text, ARRAY[%(n)s]), array_fill('bench funding'::text, ARRAY[%(n)s]),"
                " array_fill('{}'::jsonb, ARRAY[%(n)s]), %(transfer_ids)s::uuid[], %(event_ids)s::uuid[])",
                {"n": len(batch), "request_ids": [f"fund-{a}" for a in batch], "ids": batch, "amount": FUNDING,
                 "currency": CURRENCY, "transfer_ids": [new_id() for _ in batch],
                 "event_ids": [new_id() for _ in batch]}).fetchone()
            assert errors == (0,), errors


def write_pairs(bench: Bench, distribution: str, first: int, count: int, rng: random.Random) -> None:
    pairs = []
    for _ in range(PAIRS):
        source, target = rng.sample(range(first, first + count), 2)
        pairs.append([bench.account_id(source), bench.account_id(target)])
    bench.pairs_file(distribution).write_text(json.dumps(pairs))


def ghz_messages(bench: Bench, distribution: str) -> Path:
    pairs = json.loads(bench.pairs_file(distribution).read_text())
    messages = [{"request_id": "bench-{{newUUID}}", "from_account_id": source, "to_account_id": target,
                 "amount": "1", "currency": CURRENCY} for source, target in pairs]
    path = bench.workdir / f"ghz-{distribution}.json"
    path.write_text(json.dumps(messages))
    return path


# --- the load generators -------------------------------------------------------------------------

def run_ghz(bench: Bench, result: Result, target: str, data_file: Path, duration_s: float | None = None) -> Result:
    out = bench.workdir / f"ghz-{result.path}-{result.distribution}-{result.clients}.json"
    command = [
        str(BIN / "ghz"), "--insecure", "--protoset", str(REPO / "gen" / "bank.pb"),
        "--call", "bank.transfer.v1.TransferService/CreateTransfer",
        "--concurrency", str(result.clients), "--connections", str(min(result.clients, 8)),
        # Stop sending at the end but let in-flight calls finish: cut calls are not the ledger's errors.
        "--duration", f"{duration_s or result.duration_s}s", "--duration-stop", "wait", "--timeout", "10s",
        "--data-file", str(data_file),
        "--metadata", json.dumps({"authorization": f"Bearer {bench.token}"}),
        "--format", "json", "--output", str(out), target,
    ]
    subprocess.run(command, check=True, timeout=RUN_TIMEOUT_S, stdout=subprocess.DEVNULL)
    report = json.loads(out.read_text())
    latencies = {f"p{int(d['percentage'])}": d["latency"] / 1e6 for d in report.get("latencyDistribution") or []}
    result.requests = int(report["count"])
    result.rps = float(report["rps"])
    result.latency_ms = {"p50": latencies.get("p50", 0.0), "p95": latencies.get("p95", 0.0),
                         "p99": latencies.get("p99", 0.0), "mean": report["average"] / 1e6}
    result.error_kinds = {k: int(v) for k, v in (report.get("errorDistribution") or {}).items()}
    result.errors = sum(result.error_kinds.values())
    return result


K6_SCRIPT = """
import http from 'k6/http';
import { check } from 'k6';
import { SharedArray } from 'k6/data';

const pairs = new SharedArray('pairs', () => JSON.parse(open(__ENV.PAIRS)));
const url = `http://127.0.0.1:${__ENV.PORT}/v1/transfers`;
const params = { headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${__ENV.TOKEN}` },
                 timeout: '10s' };

export const options = { discardResponseBodies: true, summaryTrendStats: ['avg', 'med', 'p(95)', 'p(99)', 'max'] };

export default function () {
  const [from, to] = pairs[Math.floor(Math.random() * pairs.length)];
  const body = JSON.stringify({ request_id: `bench-${crypto.randomUUID()}`, from_account_id: from,
                                to_account_id: to, amount: '1', currency: __ENV.CURRENCY });
  const response = http.post(url, body, params);
  check(response, { 'status 200': (r) => r.status === 200 });
}

export function handleSummary(data) {
  return { [__ENV.SUMMARY]: JSON.stringify(data) };
}
"""


# Holds (#18): one iteration is a place+settle pair. The bench customer owns both accounts, so
# it is the payee and may post or void. A pair's latency is the sum of its two requests'
# durations (http_req_duration, as the plain path reports); a failed pair is not timed.
K6_HOLDS_SCRIPT = """
import http from 'k6/http';
import { check } from 'k6';
import { SharedArray } from 'k6/data';
import { Counter, Trend } from 'k6/metrics';

const pairs = new SharedArray('pairs', () => JSON.parse(open(__ENV.PAIRS)));
const url = `http://127.0.0.1:${__ENV.PORT}/v1/transfers`;
const headers = { 'Content-Type': 'application/json', Authorization: `Bearer ${__ENV.TOKEN}` };
const settled = new Counter('pairs');
const pairDuration = new Trend('pair_duration', true);

export const options = { discardResponseBodies: true, summaryTrendStats: ['avg', 'med', 'p(95)', 'p(99)', 'max'] };

export default function () {
  const [from, to] = pairs[Math.floor(Math.random() * pairs.length)];
  const body = JSON.stringify({ request_id: `bench-${crypto.randomUUID()}`, from_account_id: from,
                                to_account_id: to, amount: '1', currency: __ENV.CURRENCY,
                                hold_seconds: Number(__ENV.HOLD_SECONDS) });
  const placed = http.post(url, body, { headers, timeout: '10s', responseType: 'text' });
  if (!check(placed, { 'hold placed': (r) => r.status === 200 && r.json('status') === 'PENDING' })) {
    return;
  }
  const settle = Math.random() < 0.1 ? 'void' : 'post';
  const response = http.post(`${url}/${placed.json('transfer_id')}:${settle}`,
                             JSON.stringify({ request_id: `bench-${crypto.randomUUID()}` }),
                             { headers, timeout: '10s' });
  if (check(response, { 'hold settled': (r) => r.status === 200 })) {
    settled.add(1);
    pairDuration.add(placed.timings.duration + response.timings.duration);
  }
}

export function handleSummary(data) {
  return { [__ENV.SUMMARY]: JSON.stringify(data) };
}
"""


def run_k6(bench: Bench, result: Result, *, holds: bool = False) -> Result:
    k6 = BIN / "k6"
    if not k6.exists():
        result.note = "skipped: no k6 in .stack/bin"
        return result
    script = bench.workdir / ("rest-holds.js" if holds else "rest.js")
    script.write_text(K6_HOLDS_SCRIPT if holds else K6_SCRIPT)
    summary = bench.workdir / f"k6-{result.path}-{result.distribution}-{result.clients}.json"
    env = dict(os.environ, PAIRS=str(bench.pairs_file(result.distribution)), PORT=str(bench.settings.envoy_port),
               TOKEN=bench.token, CURRENCY=CURRENCY, SUMMARY=str(summary), K6_NO_USAGE_REPORT="true",
               HOLD_SECONDS=str(HOLD_SECONDS))
    subprocess.run([str(k6), "run", "--quiet", "--no-color", "--vus", str(result.clients), "--duration",
                    f"{result.duration_s}s", str(script)], check=True, timeout=RUN_TIMEOUT_S, env=env,
                   stdout=subprocess.DEVNULL)
    metrics = json.loads(summary.read_text())["metrics"]
    if holds:
        durations = metrics.get("pair_duration", {}).get("values", {})
        pairs = metrics.get("pairs", {}).get("values", {})
        result.requests = int(pairs.get("count", 0))
        result.rps = float(pairs.get("rate", 0.0))
        result.latency_ms = {"p50": durations.get("med", 0.0), "p95": durations.get("p(95)", 0.0),
                             "p99": durations.get("p(99)", 0.0), "mean": durations.get("avg", 0.0)}
        checks = metrics["checks"]["values"]
        result.errors = int(checks.get("fails", 0))
        if result.errors:
            result.error_kinds = {"pairs refused or failed (non-200)": result.errors}
        return result
    durations = metrics["http_req_duration"]["values"]
    result.requests = int(metrics["http_reqs"]["values"]["count"])
    result.rps = float(metrics["http_reqs"]["values"]["rate"])
    result.latency_ms = {"p50": durations["med"], "p95": durations["p(95)"], "p99": durations["p(99)"],
                         "mean": durations["avg"]}
    failed = metrics["checks"]["values"].get("fails", 0)
    result.errors = int(failed)
    if failed:
        result.error_kinds = {"non-200 responses": int(failed)}
    return result


# The statement svc_transfer's store.py sends (one round trip), with a batch of one movement; only
# the literal values differ (ids made by the caller, as svc_transfer makes them in Python).
# $-placeholders are our own constants.
PGBENCH_SCRIPT = string.Template("""\\set f random(0, $last)
\\set o random(1, $last)
SELECT * FROM transfer.move_money_batch(ARRAY['customer:$owner'],
    ARRAY['bench-' || gen_random_uuid()::text], ARRAY['TRANSFER'], ARRAY['$owner'::uuid],
    ARRAY[format('$prefix-0000-4000-8000-%s', lpad(($first + :f)::text, 12, '0'))::uuid],
    ARRAY[format('$prefix-0000-4000-8000-%s', lpad(($first + (:f + :o) % $count)::text, 12, '0'))::uuid],
    ARRAY[1::bigint], ARRAY['$currency'], ARRAY[''], ARRAY['{}'::jsonb], ARRAY[transfer.uuid_v7()],
    ARRAY[transfer.uuid_v7()]);
""")


# Holds (#18), one place+settle pair per pgbench "transaction" (the script; its latency is the
# pair's): the placement as svc_transfer sends CreateTransfer with hold_seconds, then, as the
# payee's PostTransfer (9 in 10) or VoidTransfer would, a POST or VOID naming the hold, each in its
# own transaction. A refusal comes back as a row, not an error; `error::int` turns one into an
# error ('invalid input syntax for type integer: "<REASON>"') that aborts the client and is
# counted (no refusal is expected; the plain script does not look). pgbench replaces :hold_id
# even inside the quotes.
PGBENCH_HOLDS_SCRIPT = string.Template("""\\set f random(0, $last)
\\set o random(1, $last)
\\set settle random(1, 10)
SELECT transfer_id AS hold_id, coalesce(error::int, 0) AS refused FROM transfer.move_money_batch(
    ARRAY['customer:$owner'], ARRAY['bench-' || gen_random_uuid()::text], ARRAY['TRANSFER'], ARRAY['$owner'::uuid],
    ARRAY[format('$prefix-0000-4000-8000-%s', lpad(($first + :f)::text, 12, '0'))::uuid],
    ARRAY[format('$prefix-0000-4000-8000-%s', lpad(($first + (:f + :o) % $count)::text, 12, '0'))::uuid],
    ARRAY[1::bigint], ARRAY['$currency'], ARRAY[''], ARRAY['{}'::jsonb], ARRAY[transfer.uuid_v7()],
    ARRAY[transfer.uuid_v7()], p_hold_seconds => ARRAY[$hold_seconds])
\\gset
\\if :settle = 1
SELECT error::int FROM transfer.move_money_batch(ARRAY['customer:$owner'],
    ARRAY['bench-' || gen_random_uuid()::text], ARRAY['VOID'], ARRAY['$owner'::uuid], ARRAY[NULL::uuid],
    ARRAY[NULL::uuid], ARRAY[NULL::bigint], ARRAY[NULL::text], ARRAY[NULL::text], ARRAY['{}'::jsonb],
    ARRAY[NULL::uuid], ARRAY[transfer.uuid_v7()], p_hold_ids => ARRAY[':hold_id'::uuid]);
\\else
SELECT error::int FROM transfer.move_money_batch(ARRAY['customer:$owner'],
    ARRAY['bench-' || gen_random_uuid()::text], ARRAY['POST'], ARRAY['$owner'::uuid], ARRAY[NULL::uuid],
    ARRAY[NULL::uuid], ARRAY[NULL::bigint], ARRAY[NULL::text], ARRAY[NULL::text], ARRAY['{}'::jsonb],
    ARRAY[NULL::uuid], ARRAY[transfer.uuid_v7()], p_hold_ids => ARRAY[':hold_id'::uuid],
    p_money_event_ids => ARRAY[transfer.uuid_v7()]);
\\endif
""")
HOLD_SECONDS = 3600  # far beyond a run: no hold of the bench lapses before it is settled


def run_pgbench(bench: Bench, result: Result, first: int, count: int, *, holds: bool = False) -> Result:
    """The statement svc_transfer sends, straight from pgbench's clients (holds: the pair of them)."""
    script = bench.workdir / f"{result.path}.sql"
    template = PGBENCH_HOLDS_SCRIPT if holds else PGBENCH_SCRIPT
    script.write_text(template.substitute(owner=bench.owner_id, prefix=bench.prefix, first=first, last=count - 1,
                                          count=count, currency=CURRENCY, hold_seconds=HOLD_SECONDS))
    return _pgbench(bench, result, script, ["-M", "simple"], dict(os.environ, PGPASSWORD=bench.settings.pg_password))


def _pgbench(bench: Bench, result: Result, script: Path, options: list[str], env: dict[str, str]) -> Result:
    log_prefix = bench.workdir / f"pgbench-{result.path}-{result.distribution}-{result.clients}"
    settings = bench.settings
    completed = subprocess.run(
        ["pgbench", "-h", settings.pg_host, "-p", str(leader_port(settings)), "-U", settings.pg_user, "-n", *options,
         "-c", str(result.clients), "-j", "2", "-T", str(int(result.duration_s)), "-f", str(script),
         "--log", f"--log-prefix={log_prefix}", settings.pg_database],
        check=False, timeout=RUN_TIMEOUT_S, env=env, capture_output=True, text=True)
    # Exit status 2: some clients were aborted by an error (a lock wait past lock_timeout, say);
    # the others ran on, and their results count. Anything else is the bench's own failure.
    if completed.returncode not in (0, 2):
        raise RuntimeError(f"pgbench exited with {completed.returncode}: {completed.stderr[-2000:]}")
    latencies_us = []
    for log in bench.workdir.glob(f"{log_prefix.name}*"):
        for line in log.read_text().splitlines():
            latencies_us.append(int(line.split()[2]))
    latencies_us.sort()
    match = re.search(r"tps = ([\d.]+) \(without initial connection time\)", completed.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", completed.stdout)
    result.requests = len(latencies_us)
    result.rps = float(match.group(1)) if match else result.requests / result.duration_s
    result.errors = int(failed.group(1)) if failed else 0
    # pgbench 15 says "client 3 script 0 aborted in command 1 query 0: ERROR: ..."
    aborted = re.findall(r"client \d+ (?:script \d+ )?aborted", completed.stderr)
    if aborted:
        reasons = re.findall(r"ERROR:\s+(.+)", completed.stderr)
        result.errors += len(aborted)
        result.error_kinds = {f"clients aborted ({reasons[0] if reasons else 'see pgbench stderr'})": len(aborted)}

    def percentile(p: float) -> float:
        return latencies_us[min(len(latencies_us) - 1, int(p * len(latencies_us)))] / 1000 if latencies_us else 0.0
    result.latency_ms = {"p50": percentile(0.50), "p95": percentile(0.95), "p99": percentile(0.99),
                         "mean": statistics.fmean(latencies_us) / 1000 if latencies_us else 0.0}
    return result


CEILING = REPO / "perf" / "ceiling"
CEILING_SCHEMA = "ceiling"


def prepare_ceiling(settings: config.Settings) -> None:
    """The ceiling's own tables in schema "ceiling", emptied of earlier runs' rows (so that every
    run starts from the same table sizes), accounts funded again."""
    with psycopg.connect(settings.pg_conninfo, autocommit=True) as conn:
        conn.execute("SET statement_timeout = '300s'")
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {CEILING_SCHEMA}")
        conn.execute(f"SET search_path = {CEILING_SCHEMA}")
        conn.execute((CEILING / "ceiling.sql").read_text())  # type: ignore[arg-type]  # our own file
        conn.execute("TRUNCATE outbox, idem, entries, transfers")
        conn.execute("UPDATE accounts SET balance = 1000000000")
        conn.execute("VACUUM ANALYZE accounts")


def run_ceiling(bench: Bench, result: Result, count: int) -> Result:
    """The yardstick: ceiling.pgbench over `count` accounts, as ../shared/perf/README.md runs it."""
    settings = bench.settings
    env = dict(os.environ, PGPASSWORD=settings.pg_password, PGOPTIONS=f"-c search_path={CEILING_SCHEMA}")
    return _pgbench(bench, result, CEILING / "ceiling.pgbench", ["-D", f"naccts={count}"], env)


# --- checks and output -------------------------------------------------------------------------------

def ledger_check(bench: Bench, total_accounts: int) -> dict[str, Any]:
    """The bench's money stayed in the bench's accounts; every movement has its entries and events;
    what the accounts hold back for holds is what their PENDING holds add up to.

    Entries: two summing to zero for a completed movement (a posted hold's are its post's), none
    for a hold that was never posted. Outbox rows, keyed by the transfer (a hold's by the hold):
    a transfer's MoneyMoved; a hold's HoldPlaced, then HoldPosted and MoneyMoved, or HoldVoided
    or HoldExpired. A PENDING hold left over is a pair cut short (counted in its run's errors)."""
    ids = [bench.account_id(i) for i in range(total_accounts)]
    with psycopg.connect(bench.settings.pg_conninfo, autocommit=True) as conn:
        conn.execute("SET statement_timeout = '120s'")
        [(balance_total, negative, pending_debits, pending_credits, unavailable)] = conn.execute(
            "SELECT sum(balance), count(*) FILTER (WHERE balance < 0), sum(pending_debits), sum(pending_credits),"
            "       count(*) FILTER (WHERE balance - pending_debits < 0)"
            "  FROM transfer.ledger_accounts WHERE account_id = ANY(%s::uuid[])", (ids,)).fetchall()
        [(movements, holds, pending_holds, held_pending, unbalanced, events, expected_events)] = conn.execute(
            "WITH t AS (SELECT transfer_id, status, held_amount FROM transfer.transfers"
            "            WHERE request_id LIKE 'bench-%%' AND from_account_id = ANY(%s::uuid[])),"
            "     e AS (SELECT e.transfer_id, count(*) AS n, sum(e.amount) AS total"
            "             FROM transfer.entries e JOIN t USING (transfer_id) GROUP BY e.transfer_id)"
            " SELECT (SELECT count(*) FROM t),"
            "        (SELECT count(*) FROM t WHERE held_amount IS NOT NULL),"
            "        (SELECT count(*) FROM t WHERE status = 'PENDING'),"
            "        (SELECT coalesce(sum(held_amount), 0) FROM t WHERE status = 'PENDING'),"
            "        (SELECT count(*) FROM t LEFT JOIN e USING (transfer_id)"
            "          WHERE coalesce(e.n, 0) <> CASE WHEN t.status = 'COMPLETED' THEN 2 ELSE 0 END"
            "             OR coalesce(e.total, 0) <> 0),"
            "        (SELECT count(*) FROM transfer.outbox o JOIN t ON o.aggregate_id = t.transfer_id::text),"
            "        (SELECT coalesce(sum(CASE WHEN held_amount IS NULL THEN 1 WHEN status = 'COMPLETED' THEN 3"
            "                                  WHEN status = 'PENDING' THEN 1 ELSE 2 END), 0) FROM t)",
            (ids,)).fetchall()
    check = {"balance_total": int(balance_total), "expected_total": FUNDING * total_accounts,
             "negative_balances": int(negative), "movements": int(movements), "unbalanced_movements": int(unbalanced),
             "outbox_events": int(events), "expected_outbox_events": int(expected_events), "holds": int(holds),
             "pending_holds": int(pending_holds), "held_by_pending_holds": int(held_pending),
             "pending_debits": int(pending_debits), "pending_credits": int(pending_credits),
             "negative_available": int(unavailable)}
    check["ok"] = (check["balance_total"] == check["expected_total"] and not negative and not unbalanced
                   and events == expected_events and not unavailable
                   and pending_debits == pending_credits == held_pending)
    return check


def shares(results: list[Result]) -> None:
    """Each figure as a share of the ceiling of the same run (same distribution and client count),
    and each holds figure (pairs/s) as a ratio to its path's plain transfers/s of the same run."""
    ceilings = {(r.distribution, r.clients): r.rps for r in results if r.path == "ceiling" and r.rps}
    plain = {(r.path, r.distribution, r.clients): r.rps for r in results if r.rps}
    print("\nshare of the ceiling (ceiling.sql by pgbench, same run):", flush=True)
    for r in results:
        ceiling = ceilings.get((r.distribution, r.clients))
        transfers = plain.get((HOLDS_OF.get(r.path, ""), r.distribution, r.clients))
        if transfers:
            r.ratio_to_transfers = round(r.rps / transfers, 3)
        if ceiling and r.path != "ceiling":
            r.share_of_ceiling = round(r.rps / ceiling, 3)
            print(f"  {r.path:20} {r.distribution:7} {r.clients:3} clients: {r.rps:8.0f} {r.unit} ="
                  f" {r.share_of_ceiling:6.1%} of {ceiling:.0f}/s  (p99 {r.latency_ms.get('p99', 0):.1f} ms)"
                  + (f", {r.ratio_to_transfers:.2f} x {HOLDS_OF[r.path]}'s {transfers:.0f}/s" if transfers else ""),
                  flush=True)
    print("\nCPU per request, ms, by process group (middle of each run):", flush=True)
    for r in results:
        print(f"  {r.path:20} {r.distribution:7} {r.clients:3} clients: "
              + ", ".join(f"{group} {ms:.2f}" for group, ms in r.cpu_ms_per_request.items()), flush=True)


def table(results: list[Result]) -> list[str]:
    """The run as a Markdown table (for the README and commit messages)."""
    lines = ["| path | distribution | clients | rate | share of ceiling | ratio to transfers/s | p99 ms | errors |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        share = f"{r.share_of_ceiling:.1%}" if r.share_of_ceiling is not None else "-"
        ratio = f"{r.ratio_to_transfers:.2f}" if r.ratio_to_transfers is not None else "-"
        lines.append(f"| {r.path} | {r.distribution} | {r.clients} | {r.rps:,.0f} {r.unit} | {share} | {ratio}"
                     f" | {r.latency_ms.get('p99', 0):.1f} | {r.errors} |")
    return lines


def chart(results: list[Result], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r.distribution, r.clients) for r in results}, key=lambda g: (g[0] != "uniform", g[1]))
    paths = list(dict.fromkeys(r.path for r in results))
    by_key = {(r.path, r.distribution, r.clients): r for r in results}
    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(14, 5.5))
    width = 0.8 / len(paths)
    for i, name in enumerate(paths):
        xs = [g + i * width for g in range(len(groups))]
        found = [by_key.get((name, d, c)) for d, c in groups]
        throughput.bar(xs, [r.rps if r else 0 for r in found], width, label=name)
        latency.bar(xs, [r.latency_ms.get("p99", 0) if r else 0 for r in found], width, label=name)
    labels = [f"{d}\n{c} clients" for d, c in groups]
    for axis, title in ((throughput, "throughput (movements/s; holds: place+settle pairs/s)"), (latency, "p99 latency (ms)")):
        axis.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], labels)
        axis.set_title(title)
        axis.grid(axis="y", alpha=0.3)
    throughput.legend()
    figure.suptitle("Simple Bank ledger: CreateTransfer on 2 cores (load generator on the same machine)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --- where the CPU goes ---------------------------------------------------------------------------

CLOCK_TICKS_S = os.sysconf("SC_CLK_TCK")
LOAD_GENERATORS = ("ghz", "k6", "pgbench")


def cpu_groups() -> dict[str, float]:
    """CPU seconds used so far by each group of processes on this machine (from /proc)."""
    used: dict[str, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            name, fields = stat.read_text().rsplit(")", 1)
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        comm = name.partition("(")[2]
        values = fields.split()
        seconds = (int(values[11]) + int(values[12])) / CLOCK_TICKS_S
        if "-m svc_" in cmdline:
            group = cmdline.split("-m ", 1)[1].split()[0]
        elif comm in ("postgres", "envoy") or comm in LOAD_GENERATORS:
            group = "load generator" if comm in LOAD_GENERATORS else comm
        elif comm == "java":
            group = "kafka" if "kafka" in cmdline else "cassandra" if "cassandra" in cmdline else "java"
        else:
            group = "everything else"
        used[group] = used.get(group, 0.0) + seconds
    return used


class CpuWindow:
    """Samples cpu_groups() 2 s into a run and 1 s before its end, in a thread: the middle of the
    run, where the load generator and the backends it opened are all alive."""

    def __init__(self, duration_s: float) -> None:
        import threading
        self._samples: list[tuple[float, dict[str, float]]] = []
        self._thread = threading.Thread(target=self._sample, args=(duration_s,), daemon=True)
        self._thread.start()

    def _sample(self, duration_s: float) -> None:
        time.sleep(2.0)
        self._samples.append((time.monotonic(), cpu_groups()))
        time.sleep(max(1.0, duration_s - 3.0))
        self._samples.append((time.monotonic(), cpu_groups()))

    def per_request(self, rps: float) -> dict[str, float]:
        """ms of CPU per request of each group: its cores over the window / requests per second."""
        self._thread.join()
        if len(self._samples) < 2 or not rps:
            return {}
        (t0, before), (t1, after) = self._samples
        cores = {group: (after.get(group, 0.0) - before.get(group, 0.0)) / (t1 - t0) for group in after}
        return {group: round(c * 1000 / rps, 3) for group, c in sorted(cores.items(), key=lambda kv: -kv[1]) if c > 0.005}


def run_all(bench: Bench, results: list[Result], layouts: dict[str, tuple[int, int]], clients: list[int],
            paths: list[str], grpc_targets: dict[str, str], data_files: dict[str, Path]) -> None:
    """Every path at every client count over both distributions, appending to results as it goes."""
    for distribution, (first, count) in layouts.items():
        for client_count in clients:
            for name in paths:
                result = Result(name, distribution, client_count, float(bench.duration_s),
                                unit="pairs/s" if name in HOLDS_OF else "movements/s")
                window = CpuWindow(bench.duration_s)
                if name in grpc_targets:
                    run_ghz(bench, result, grpc_targets[name], data_files[distribution])
                elif name == "rest-envoy":
                    run_k6(bench, result)
                elif name == "rest-envoy-holds":
                    run_k6(bench, result, holds=True)
                elif name == "pgbench":
                    run_pgbench(bench, result, first, count)
                elif name == "pgbench-holds":
                    run_pgbench(bench, result, first, count, holds=True)
                elif name == "ceiling":
                    run_ceiling(bench, result, count)
                result.cpu_ms_per_request = window.per_request(result.rps)
                results.append(result)
                print(f"  {name:16} {distribution:7} {client_count:3} clients: {result.rps:8.0f} {result.unit}"
                      f"  p50 {result.latency_ms.get('p50', 0):6.1f} ms  p99 {result.latency_ms.get('p99', 0):6.1f} ms"
                      f"  errors {result.errors} {result.note}", flush=True)


def drain(settings: config.Settings) -> None:
    """Waits until the consumers started again have handled what the runs published: a draining
    backlog takes most of the database, and would weigh on whatever runs next."""
    print(f"waiting for the consumers to catch up with the runs' events (at most {DRAIN_TIMEOUT_S:.0f} s)...",
          flush=True)
    started = time.monotonic()
    try:
        wait_caught_up(settings, DRAIN_TIMEOUT_S)
    except RuntimeError as exc:
        print(f"  {exc}: they are still draining", flush=True)
        return
    print(f"  caught up after {time.monotonic() - started:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=int, default=10, help="seconds per run (default 10)")
    parser.add_argument("--clients", default="16,64", help="comma-separated client counts (default 16,64)")
    parser.add_argument("--paths", default="ceiling,grpc-direct,grpc-envoy,rest-envoy,rest-envoy-holds,pgbench,"
                                           "pgbench-holds", help="comma-separated, of: " + ", ".join(PATHS))
    parser.add_argument("--pause-consumers", action="store_true",
                        help="stop svc_account and svc_notify for the runs (the synchronous path alone: their event "
                             "consumers otherwise take about a core of the two), and start them again afterwards, "
                             "waiting until they have caught up")
    parser.add_argument("--whole-stack-first", action="store_true",
                        help="before pausing the consumers, one rest-envoy run per client count (uniform) with every "
                             "consumer running and no backlog: path rest-envoy+consumers")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    paths = args.paths.split(",")
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        parser.error(f"unknown paths {', '.join(unknown)}; the paths are {', '.join(PATHS)}")

    settings = config.load()
    check_stack(settings)
    if not (BIN / "ghz").exists():
        raise SystemExit("no ghz in .stack/bin: run `make tools`")
    if shutil.which("pgbench") is None and {"pgbench", "pgbench-holds", "ceiling"} & set(paths):
        raise SystemExit("no pgbench on PATH (Debian: apt-get install postgresql-client)")
    RESULTS.mkdir(parents=True, exist_ok=True)

    owner_id = str(uuid.uuid4())
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        bench = Bench(settings, f"be{uuid.uuid4().hex[:6]}", owner_id, test_tokens(settings).customer(owner_id),
                      args.duration_s, Path(tmp))
        started = time.monotonic()
        print(f"opening and funding {UNIFORM_ACCOUNTS + HOT_ACCOUNTS} accounts (prefix {bench.prefix})...", flush=True)
        open_accounts(bench, UNIFORM_ACCOUNTS + HOT_ACCOUNTS, 0)
        rng = random.Random(7)  # noqa: S311  # load-test data, not secrets
        layouts = {"uniform": (0, UNIFORM_ACCOUNTS), "hot": (UNIFORM_ACCOUNTS, HOT_ACCOUNTS)}
        for distribution, (first, count) in layouts.items():
            write_pairs(bench, distribution, first, count, rng)
        data_files = {d: ghz_messages(bench, d) for d in layouts}
        grpc_targets = {"grpc-direct": f"127.0.0.1:{settings.transfer_grpc_port}",
                        "grpc-envoy": f"127.0.0.1:{settings.envoy_port}"}
        if "ceiling" in paths:
            prepare_ceiling(settings)
        print("warming up (3 s, not recorded)...", flush=True)
        run_ghz(bench, Result("warmup", "uniform", 16, 3), grpc_targets["grpc-direct"], data_files["uniform"])
        results: list[Result] = []
        if args.whole_stack_first:
            for client_count in clients:
                window = CpuWindow(bench.duration_s)
                result = run_k6(bench, Result("rest-envoy+consumers", "uniform", client_count, float(args.duration_s)))
                result.cpu_ms_per_request = window.per_request(result.rps)
                results.append(result)
                print(f"  {result.path} uniform {client_count:3} clients: {result.rps:8.0f}/s"
                      f"  p99 {result.latency_ms.get('p99', 0):6.1f} ms  errors {result.errors}", flush=True)
        if args.pause_consumers:
            # They catch up from their committed offsets when they start again: nothing is lost.
            Stack(settings).down(CONSUMERS)
        if "ceiling" in paths:
            # The yardstick gets a warm-up too, on the database as the runs will find it: its first
            # recorded run straight after the whole-stack runs once came out at a sixth of the
            # next ones (887/s at 16 clients, Postgres 2.1 ms per transfer against 0.3-0.4).
            print("warming up the ceiling (5 s, not recorded)...", flush=True)
            run_ceiling(bench, Result("warmup-ceiling", "uniform", 16, 5), UNIFORM_ACCOUNTS)
        try:
            run_all(bench, results, layouts, clients, paths, grpc_targets, data_files)
        finally:
            if args.pause_consumers:
                asyncio.run(Stack(settings).up(CONSUMERS))
        shares(results)
        print("\n" + "\n".join(table(results)), flush=True)
        check = ledger_check(bench, UNIFORM_ACCOUNTS + HOT_ACCOUNTS)
        print(f"ledger check after the bench: {check}", flush=True)

        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        report = {"time": stamp, "duration_s_per_run": args.duration_s, "cpu_cores": os.cpu_count(),
                  "accounts": {"uniform": UNIFORM_ACCOUNTS, "hot": HOT_ACCOUNTS}, "currency": CURRENCY,
                  "transfer_processes": settings.processes("transfer"), "pg_pool_max_per_process": settings.pg_pool_max,
                  "pg_nodes": settings.pg_nodes, "consumers_paused": args.pause_consumers, "hold_seconds": HOLD_SECONDS, "void_share": 0.1,
                  "table": table(results),
                  "ledger_check": check, "results": [asdict(r) for r in results],
                  "wall_time_s": round(time.monotonic() - started, 1)}
        json_path, png_path = RESULTS / f"transfer-{stamp}.json", RESULTS / f"transfer-{stamp}.png"
        json_path.write_text(json.dumps(report, indent=2))
        chart(results, png_path)
        shutil.copyfile(json_path, RESULTS / "transfer-latest.json")
        shutil.copyfile(png_path, RESULTS / "transfer-latest.png")
        print(f"wrote {json_path} and {png_path} ({report['wall_time_s']} s)")
        if args.pause_consumers:
            drain(settings)
        if not check["ok"]:
            raise SystemExit("the ledger check failed after the bench")


if __name__ == "__main__":
    main()

"""Operations: the alerting and recording rules are valid, fire when they should (promtool's
unit tests), and are loaded by the running Prometheus; every process exposes its metrics and
Prometheus scrapes them all; consumer lag follows a real backlog; one transfer can be followed
through the logs of every process by its request id."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from bank.events.v1 import events_pb2
from google.protobuf.message import Message
from prometheus_client import REGISTRY

from common.config import REPO_ROOT, Settings
from common.consumer import EventConsumer, EventMeta, Route
from devstack import install
from devstack.stack import Stack
from tests.events_support import publish, scratch_topic
from tests.support import rest

RULES = REPO_ROOT / "deploy" / "prometheus"


def _promtool(stack: Stack) -> str:
    return install.debian_binary("promtool", "prometheus", stack.paths.install_log("prometheus"))


def test_rules_are_valid_and_their_unit_tests_pass(stack: Stack) -> None:
    promtool = _promtool(stack)
    for argv in ([promtool, "check", "rules", "rules.yml"], [promtool, "test", "rules", "rules.test.yml"]):
        result = subprocess.run(argv, cwd=RULES, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_local_prometheus_config_is_valid(stack: Stack) -> None:
    config = Path(stack.paths.conf / "prometheus.yml")
    result = subprocess.run([_promtool(stack), "check", "config", str(config)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_loaded_the_rules(stack: Stack, settings: Settings) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{settings.prometheus_port}/api/v1/rules", timeout=5) as resp:
        groups = json.load(resp)["data"]["groups"]
    names = {rule["name"] for group in groups for rule in group["rules"]}
    assert {"ServiceDown", "HighServerErrorRate", "HighLatencyP99", "OutboxBacklogOld", "ConsumerLagHigh",
            "ConsumerStalled", "service:grpc_latency_seconds:p99_5m", "group:consumer_lag_records:sum"} <= names


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def _sample(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def test_business_and_pool_metrics(stack: Stack, settings: Settings) -> None:
    from tests.support import login, onboard

    ports = [settings.metrics_port("transfer", i) for i in range(settings.processes("transfer"))]
    series = 'ledger_movements_total{currency="USD",kind="DEPOSIT",outcome="OK"}'
    before = sum(_sample(_scrape(port), series) for port in ports)
    customer = onboard(settings)
    account = rest(settings, "POST", "/v1/accounts", {"currency": "USD"}, token=customer.token).body
    teller = login(settings, settings.teller_username, settings.teller_password)
    deposit = rest(settings, "POST", "/v1/deposits", {"request_id": "metrics-" + account["account_id"],
                                                       "account_id": account["account_id"], "amount": "250",
                                                       "currency": "USD"}, token=teller["access_token"])
    assert deposit.status == 200, deposit.body
    after = sum(_sample(_scrape(port), series) for port in ports)
    assert after == before + 1
    for name in ("customer", "account", "transfer", "notify"):
        text = _scrape(settings.metrics_port(name, 0))
        assert f'db_pool_size{{schema="{name}"}}' in text, name


SERVICES = ("customer", "account", "transfer", "notify")


def _series(text: str, name: str) -> dict[str, float]:
    """The samples of one metric in a scrape: {'{labels}': value}."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name):].rsplit(" ", 1)
            found[labels] = float(value)
    return found


def _write_count(port: int) -> float:
    return sum(v for k, v in _series(_scrape(port), "cassandra_request_duration_seconds_count").items()
               if 'operation="write"' in k)


def test_after_a_transfer_consumers_expose_their_lag_and_cassandra_write_latency(settings: Settings) -> None:
    from tests.events_support import deposit, holder, mails_with, statement_with, teller_token, transfer

    account_port, notify_port = settings.metrics_port("account", 0), settings.metrics_port("notify", 0)
    writes_before = {port: _write_count(port) for port in (account_port, notify_port)}
    source, target = holder(settings), holder(settings)
    deposit(settings, teller_token(settings), source.account_id, 100)
    transfer(settings, source, target, 40)
    statement_with(settings, target.token, target.account_id, 1)  # svc_account's consumer wrote it
    mails_with(settings, target.email, 2)  # verification, then "received": svc_notify's consumer handled it
    for port, groups in ((account_port, {"svc_account"}), (notify_port, {"svc_notify", "svc_notify.transfer"})):
        lag = _series(_scrape(port), "consumer_lag_records")
        assert {k.split('group="')[1].split('"')[0] for k in lag} == groups, lag
        assert all(value >= 0 for value in lag.values()), lag
        assert _write_count(port) > writes_before[port], f"no Cassandra write observed on :{port}"
        buckets = _series(_scrape(port), "cassandra_request_duration_seconds_bucket")
        assert any('operation="write"' in k and 'le="0.1"' in k and v > 0 for k, v in buckets.items()), buckets


def _prometheus(settings: Settings, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{settings.prometheus_port}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]


def test_prometheus_has_every_target_up_and_latency_histograms_from_all_four_services(settings: Settings) -> None:
    expected = {f"svc_{name}" for name in SERVICES}
    deadline = time.monotonic() + 30  # scrapes every 5 s; a restarted process needs one scrape
    while True:
        targets = _prometheus(settings, "/api/v1/targets", state="active")["activeTargets"]
        down = [(t["labels"], t["health"], t["lastError"]) for t in targets if t["health"] != "up"]
        latency = _prometheus(settings, "/api/v1/query",
                              query="count by (service) (grpc_server_handling_seconds_bucket)")["result"]
        services = {r["metric"].get("service") for r in latency}
        lag = _prometheus(settings, "/api/v1/query", query="count by (group) (consumer_lag_records)")["result"]
        writes = _prometheus(settings, "/api/v1/query", query='count by (service) '
                             '(cassandra_request_duration_seconds_bucket{operation="write"})')["result"]
        ok = (not down and expected <= services and {r["metric"]["group"] for r in lag} >= {"svc_account", "svc_notify"}
              and {r["metric"]["service"] for r in writes} >= {"svc_account", "svc_notify"})
        if ok or time.monotonic() > deadline:
            break
        time.sleep(1)
    # Every process of every service, and Envoy.
    jobs = {(t["labels"]["job"], t["labels"].get("service")) for t in targets}
    assert {("services", name) for name in expected} | {("envoy", None)} <= jobs, jobs
    assert len(targets) >= sum(settings.processes(name) for name in SERVICES) + 1
    assert not down, down
    assert expected <= services, services
    assert {r["metric"]["group"] for r in lag} >= {"svc_account", "svc_notify", "svc_notify.transfer"}, lag
    assert {r["metric"]["service"] for r in writes} >= {"svc_account", "svc_notify"}, writes


async def test_consumer_lag_follows_a_backlog_down_to_zero(settings: Settings) -> None:
    """A consumer of a topic of its own, with 30 records waiting and a slow handler: the gauge
    shows the backlog, shrinks as batches are handled, and ends at zero."""
    group = f"test-lag-{uuid.uuid4().hex[:8]}"
    async with scratch_topic(settings, "test.lag") as topic:
        await publish(settings, topic, *(events_pb2.MoneyMoved(event_id=f"lag-{n}", transfer_id=f"t-{n}")
                                         for n in range(30)), key=b"k")

        handled: list[str] = []

        async def slow(message: Message, meta: EventMeta) -> str:
            await asyncio.sleep(0.02)
            handled.append(meta.event_id)
            return "applied"

        routes = {events_pb2.MoneyMoved.DESCRIPTOR.full_name: Route(events_pb2.MoneyMoved, slow)}
        consumer = EventConsumer(settings, group_id=group, topics=[topic], routes=routes, event_worst_case_s=1.0,
                                 batch_max_records=5)
        labels = {"group": group, "topic": topic, "partition": "0"}
        seen: list[float] = []
        await consumer.start()
        try:
            deadline = asyncio.get_running_loop().time() + 30
            while len(handled) < 30 or not seen or seen[-1] != 0:
                assert asyncio.get_running_loop().time() < deadline, (len(handled), seen)
                value = REGISTRY.get_sample_value("consumer_lag_records", labels)
                if value is not None and (not seen or seen[-1] != value):
                    seen.append(value)
                await asyncio.sleep(0.005)
        finally:
            await consumer.stop()
        assert handled == [f"lag-{n}" for n in range(30)]
        # The backlog was seen (30 less the first batch or two), then only shrank, to zero.
        assert max(seen) >= 20, seen
        peak = seen.index(max(seen))
        assert seen[peak:] == sorted(seen[peak:], reverse=True) and seen[-1] == 0, seen
        assert len(seen[peak:]) >= 3, seen


def _new_lines(offsets: dict[Path, int], request_id: str) -> list[dict[str, Any]]:
    """The JSON lines mentioning request_id written to the logs since offsets were taken."""
    found = []
    for path, offset in offsets.items():
        with open(path, "rb") as log:
            log.seek(offset)
            for raw in log:
                if request_id.encode() in raw:
                    found.append(json.loads(raw))
    return found


def test_one_transfer_can_be_followed_through_the_logs(settings: Settings) -> None:
    """What the README's "Follow one transfer through the logs" does: every hop of a transfer
    writes one JSON line with its request id: Envoy's access log, svc_transfer's RPC line, the
    outbox relay's, and the consumers' in svc_account and svc_notify. The caller's traceparent
    reaches svc_transfer through Envoy (its trace id is on the RPC line) and the consumers
    through the event's Kafka headers (on their lines too)."""
    from tests.events_support import deposit, holder, teller_token

    source, target = holder(settings), holder(settings)
    deposit(settings, teller_token(settings), source.account_id, 100)
    logs = Path(settings.stack_dir) / "logs"
    names = ["envoy", *(f"svc_{n}" if i == 0 else f"svc_{n}-{i + 1}"
                        for n in ("transfer", "account", "notify") for i in range(settings.processes(n)))]
    offsets = {logs / f"{name}.log": (logs / f"{name}.log").stat().st_size for name in names}
    request_id, trace_id = f"follow-{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
    response = rest(settings, "POST", "/v1/transfers", {
        "request_id": uuid.uuid4().hex, "from_account_id": source.account_id, "to_account_id": target.account_id,
        "amount": 7, "currency": "USD"}, token=source.token,
        headers={"x-request-id": request_id, "traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"})
    assert response.status == 200, response.body

    def hop(line: dict[str, Any]) -> str:
        if line.get("service") == "envoy":
            return "envoy"
        return f"{line['service']} {line['logger']} {line.get('group', '')}".strip()

    expected = {"envoy", "svc_transfer rpc", "svc_transfer outbox", "svc_account consumer svc_account",
                "svc_notify consumer svc_notify.transfer"}
    deadline = time.monotonic() + 20
    while True:
        lines = _new_lines(offsets, request_id)
        hops = {hop(line) for line in lines}
        if expected <= hops or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert expected <= hops, hops
    assert all(line["request_id"] == request_id for line in lines)
    [rpc] = [line for line in lines if hop(line) == "svc_transfer rpc"]
    assert rpc["method"] == "/bank.transfer.v1.TransferService/CreateTransfer" and rpc["grpc_code"] == "OK"
    assert rpc["trace_id"] == trace_id, "the caller's traceparent did not reach svc_transfer through Envoy"
    handled = [line for line in lines if line.get("message") == "event handled"]
    assert {line["event_type"] for line in handled} == {"bank.events.v1.MoneyMoved"}
    assert len({line["event_id"] for line in handled}) == 1, "both consumers handled the one event of the transfer"
    assert [line.get("trace_id") for line in handled] == [trace_id] * len(handled), \
        "the traceparent did not travel with the event"


def test_log_level_per_service_from_the_environment() -> None:
    """BANK_<SERVICE>_LOG_LEVEL over BANK_LOG_LEVEL, as common/server.py sets each process up."""
    code = ("import logging\n"
            "from common import config, logging as bank_logging\n"
            "settings = config.load()\n"
            "for name in ('notify', 'account'):\n"
            "    bank_logging.setup(f'svc_{name}', settings.service_log_level(name))\n"
            "    logging.getLogger('x').info('info line')\n"
            "    logging.getLogger('x').warning('warning line')\n")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_LOG_LEVEL")}
    env.update(BANK_LOG_LEVEL="WARNING", BANK_ACCOUNT_LOG_LEVEL="info")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    lines = [(line["service"], line["level"]) for line in map(json.loads, result.stdout.splitlines())]
    assert lines == [("svc_notify", "WARNING"), ("svc_account", "INFO"), ("svc_account", "WARNING")]

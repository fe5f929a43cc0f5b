"""Operations: the alerting and recording rules are valid, fire when they should (promtool's
unit tests), and are loaded by the running Prometheus."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

from common.config import REPO_ROOT, Settings
from devstack import install
from devstack.stack import Stack

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
    assert {"ServiceDown", "HighServerErrorRate", "HighLatencyP99", "OutboxBacklogOld",
            "service:grpc_latency_seconds:p99_5m"} <= names


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def _sample(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def test_business_and_pool_metrics(stack: Stack, settings: Settings) -> None:
    from tests.support import login, onboard, rest

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

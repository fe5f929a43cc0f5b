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

"""Each service on its own gRPC port: health, reflection, metrics, graceful shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common.config import REPO_ROOT, Settings
from devstack.stack import Stack
from tests.support import rest
from tests.tokens import test_tokens

EXPECTED_SERVICES = {
    "customer": {"bank.customer.v1.CustomerService", "bank.auth.v1.AuthService",
                 "bank.customer.v1.CustomerInternalService"},
    "account": {"bank.account.v1.AccountService"},
    "transfer": {"bank.transfer.v1.TransferService", "bank.transfer.v1.LedgerService"},
    "notify": {"bank.notify.v1.NotificationService"},
}

SPARE_GRPC_PORT = 19954


async def _reflected_services(address: str) -> set[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(timeout=5)
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        await call.done_writing()
        reply = await call.read()
    return {s.name for s in reply.list_services_response.service}


@pytest.mark.parametrize("name", sorted(EXPECTED_SERVICES))
async def test_service_is_healthy_and_reflects_its_services(stack: Stack, settings: Settings, name: str) -> None:
    address = f"127.0.0.1:{getattr(settings, f'{name}_grpc_port')}"
    reflected = await _reflected_services(address)
    assert EXPECTED_SERVICES[name] <= reflected
    assert {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= reflected
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ["", *EXPECTED_SERVICES[name]]:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


@pytest.mark.parametrize("name", sorted(EXPECTED_SERVICES))
def test_service_serves_prometheus_metrics(stack: Stack, settings: Settings, name: str) -> None:
    port = getattr(settings, f"{name}_metrics_port")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert "grpc_server_handled_total" in text
    assert "grpc_server_handling_seconds_bucket" in text


def test_service_shuts_down_gracefully_on_sigterm(stack: Stack, settings: Settings, tmp_path: Path) -> None:
    """A second svc_notify on spare ports: healthy, then SIGTERM, then a clean exit."""
    # Ports clear of the stack's own (a process also binds grpc port + 100 as its private port),
    # and below the kernel's ephemeral range (32768-60999): a port inside it can be held at any
    # moment as the local port of some outgoing connection (CI once failed on exactly that).
    grpc_port = SPARE_GRPC_PORT
    env = dict(os.environ, BANK_NOTIFY_GRPC_PORT=str(grpc_port), BANK_NOTIFY_METRICS_PORT="9904", PYTHONUNBUFFERED="1")
    # Its log goes to a file: it joins the consumer groups and logs a line per event it handles,
    # which would fill a pipe nobody reads until the end and block the process on the write.
    log_path = tmp_path / "svc_notify.log"
    with log_path.open("wb") as log_file:
        child = subprocess.Popen([sys.executable, "-m", "svc_notify"], cwd=REPO_ROOT, env=env,
                                 stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        serving = False
        while not serving and time.monotonic() < deadline and child.poll() is None:
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                except grpc.RpcError:
                    time.sleep(0.2)
        assert serving, f"the second svc_notify never became healthy:\n{log_path.read_text()[-3000:]}"
        child.send_signal(signal.SIGTERM)
        code = child.wait(timeout=settings.grpc_shutdown_grace_s + 10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    output = log_path.read_text()
    assert code == 0, output[-3000:]
    assert "stopped" in [json.loads(line).get("message") for line in output.splitlines() if line.startswith("{")]


async def test_after_a_postgres_restart_every_request_succeeds(stack: Stack, settings: Settings) -> None:
    """Postgres restarts under the running services: every pooled connection of every process is
    dead. The pools check a connection before handing it out (common/db.py check_alive) and
    replace dead ones, so no request fails on one: before, each stale connection cost one 503."""
    token = test_tokens(settings).customer(str(uuid.uuid4()))
    teller = test_tokens(settings).teller()
    assert rest(settings, "GET", "/v1/accounts", token=token).status == 200
    stack.down(["postgres"])
    await stack.up(["postgres"])
    # Sequential calls go round the idle connections of each pool: more calls than the
    # processes' pools hold connections reach every one of them.
    rounds = 2 * settings.pg_pool_max * max(settings.processes("account"), settings.processes("transfer"))
    answers = [rest(settings, "GET", "/v1/accounts", token=token).status for _ in range(rounds)]
    assert answers == [200] * rounds, answers
    # The ledger's pools too: a refusal that only the ledger decides (no such account).
    missing = {"request_id": f"restart-{uuid.uuid4()}", "account_id": str(uuid.uuid4()), "amount": "1",
               "currency": "USD"}
    refusals = [rest(settings, "POST", "/v1/deposits", body=missing, token=teller).reason for _ in range(rounds)]
    assert refusals == ["ACCOUNT_NOT_FOUND"] * rounds, refusals

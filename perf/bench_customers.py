"""Benchmark of the customers issue: Login and CreateAccount through Envoy (gRPC, ghz) under 16
concurrent clients, and the time from registration to the verification email in Mailpit.

Run against the local stack (`make up` first) with `make bench-customers`; against any other
deployment, set BANK_ENVOY_PORT / BANK_MAILPIT_HTTP_PORT (loopback only). Writes JSON to
perf/results/customers-<time>.json and prints a summary. Bounded: ghz runs for a fixed number
of requests, the email loop for a fixed number of registrations.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import config
from common.config import REPO_ROOT
from tests.support import STRONG_PASSWORD, mailpit_messages, onboard, register, rest

RESULTS = REPO_ROOT / "perf" / "results"


def ghz(settings: config.Settings, call: str, data: dict[str, Any], token: str | None, concurrency: int,
        total: int) -> dict[str, Any]:
    binary = Path(settings.stack_dir) / "bin" / "ghz"
    if not binary.exists():
        sys.exit("ghz is missing: run `make tools`")
    with tempfile.NamedTemporaryFile("w", suffix=".json") as out:
        argv = [str(binary), "--insecure", "--protoset", str(REPO_ROOT / "gen" / "bank.pb"), "--call", call,
                "-d", json.dumps(data), "-c", str(concurrency), "-n", str(total), "--timeout", "10s",
                "--format", "json", "-o", out.name, f"127.0.0.1:{settings.envoy_port}"]
        if token:
            argv[1:1] = ["-m", json.dumps({"authorization": f"Bearer {token}"})]
        subprocess.run(argv, check=True, timeout=600)
        report = json.loads(Path(out.name).read_text())
    percentiles = {f"p{int(p['percentage'])}": p["latency"] / 1e6 for p in report.get("latencyDistribution") or []}
    return {
        "call": call, "concurrency": concurrency, "requests": report["count"],
        "rps": round(report["rps"], 1), "p50_ms": round(percentiles.get("p50", 0), 2),
        "p99_ms": round(percentiles.get("p99", 0), 2), "average_ms": round(report["average"] / 1e6, 2),
        "status_codes": report.get("statusCodeDistribution", {}),
    }


def email_latency(settings: config.Settings, registrations: int) -> dict[str, Any]:
    lags = []
    for _ in range(registrations):
        customer = register(settings)
        done = time.perf_counter()
        deadline = done + 30
        while time.perf_counter() < deadline:
            if mailpit_messages(settings, f'to:"{customer["email"]}"'):
                lags.append((time.perf_counter() - done) * 1000)
                break
            time.sleep(0.005)
        else:
            raise SystemExit(f"no email for {customer['email']} within 30 s")
    lags.sort()
    return {"registrations": registrations, "p50_ms": round(statistics.median(lags), 1),
            "p99_ms": round(lags[min(len(lags) - 1, int(len(lags) * 0.99))], 1), "max_ms": round(lags[-1], 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--logins", type=int, default=400)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--registrations", type=int, default=30)
    args = parser.parse_args()
    settings = config.load()

    customer = onboard(settings)
    results: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "login": ghz(settings, "bank.auth.v1.AuthService/Login",
                     {"username": customer.username, "password": STRONG_PASSWORD}, None, args.concurrency, args.logins),
        "create_account": ghz(settings, "bank.account.v1.AccountService/CreateAccount", {"currency": "USD"},
                              customer.token, args.concurrency, args.accounts),
        "registration_to_email": email_latency(settings, args.registrations),
    }
    # Sanity: the accounts really were opened (ghz counts only status codes).
    listed = rest(settings, "GET", "/v1/accounts?page_size=500", token=customer.token)
    results["create_account"]["accounts_on_first_page_of_500"] = len(listed.body["accounts"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"customers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"\nwritten to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

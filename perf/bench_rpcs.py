"""Every public RPC under load, through Envoy: one ghz scenario per RPC (gRPC) and one k6
scenario (REST), each a fixed number of requests at a fixed concurrency, so the run is bounded.
Writes perf/results/rpcs-<time>.json and .png (throughput and p50/p99 per RPC).

    make bench-rpcs     (or: .venv/bin/python -m perf.bench_rpcs [--requests 300] [--concurrency 8])

Against another deployment: set BANK_ENVOY_PORT (loopback only, e.g. through a tunnel), and
BANK_TELLER_USERNAME / BANK_TELLER_PASSWORD for the teller scenarios.

RPCs whose request carries a single-use secret (VerifyEmail's code, RefreshSession's token,
Logout's session) cannot be replayed by a load generator; they are listed as skipped, with the
reason, and are covered by the functional tests instead.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from common import config
from common.config import REPO_ROOT
from perf.bench_customers import ghz
from tests.support import STRONG_PASSWORD, login, onboard, rest

RESULTS = REPO_ROOT / "perf" / "results"
SKIPPED = {
    "bank.customer.v1.CustomerService/VerifyEmail": "single-use verification code",
    "bank.auth.v1.AuthService/RefreshSession": "single-use rotating refresh token",
    "bank.auth.v1.AuthService/Logout": "a session can be logged out once",
    "bank.auth.v1.AuthService/CreateCredential": "single-use enrollment token",
}


def scenarios(settings: config.Settings) -> list[tuple[str, dict[str, Any], str | None, int]]:
    """(call, request data, bearer token, share of --requests): fixtures made through the API itself."""
    customer = onboard(settings)
    teller = login(settings, settings.teller_username, settings.teller_password)["access_token"]
    token = customer.token
    source = rest(settings, "POST", "/v1/accounts", {"currency": "USD"}, token=token).body["account_id"]
    target = rest(settings, "POST", "/v1/accounts", {"currency": "USD"}, token=token).body["account_id"]
    spare = rest(settings, "POST", "/v1/accounts", {"currency": "EUR"}, token=token).body["account_id"]
    funded = rest(settings, "POST", "/v1/deposits", {"request_id": uuid.uuid4().hex, "account_id": source,
                                                     "amount": "1000000000", "currency": "USD"}, token=teller)
    assert funded.status == 200, funded.body
    transfer = rest(settings, "POST", "/v1/transfers", {"request_id": uuid.uuid4().hex, "from_account_id": source,
                                                        "to_account_id": target, "amount": "1", "currency": "USD"},
                    token=token).body["transfer_id"]
    unique = "{{.UUID}}"
    return [
        ("bank.customer.v1.CustomerService/RegisterCustomer",
         {"email": f"bench-{unique}@example.com", "full_name": "Bench"}, None, 1),
        ("bank.customer.v1.CustomerService/GetCustomer", {"customer_id": customer.customer_id}, token, 1),
        ("bank.auth.v1.AuthService/Login", {"username": customer.username, "password": STRONG_PASSWORD}, None, 0),
        ("bank.account.v1.AccountService/CreateAccount", {"currency": "GBP"}, token, 1),
        ("bank.account.v1.AccountService/GetAccount", {"account_id": source}, token, 1),
        ("bank.account.v1.AccountService/ListAccounts", {"page_size": 10}, token, 1),
        ("bank.account.v1.AccountService/FreezeAccount", {"account_id": spare, "reason": "bench"}, teller, 1),
        ("bank.account.v1.AccountService/UnfreezeAccount", {"account_id": spare, "reason": "bench"}, teller, 1),
        ("bank.account.v1.AccountService/ListAccountActivity", {"account_id": source, "page_size": 10}, token, 1),
        ("bank.transfer.v1.TransferService/CreateTransfer",
         {"request_id": unique, "from_account_id": source, "to_account_id": target, "amount": "1",
          "currency": "USD"}, token, 1),
        ("bank.transfer.v1.TransferService/GetTransfer", {"transfer_id": transfer}, token, 1),
        ("bank.transfer.v1.TransferService/ListTransfers", {"account_id": source, "page_size": 10}, token, 1),
        ("bank.transfer.v1.TransferService/CreateDeposit",
         {"request_id": unique, "account_id": target, "amount": "5", "currency": "USD"}, teller, 1),
        ("bank.transfer.v1.TransferService/CreateWithdrawal",
         {"request_id": unique, "account_id": target, "amount": "1", "currency": "USD"}, teller, 1),
        ("bank.notify.v1.NotificationService/ListNotifications", {"page_size": 10}, token, 1),
        # Closing an account twice returns it unchanged, so it can be measured last, on one account.
        ("bank.account.v1.AccountService/CloseAccount", {"account_id": spare}, token, 1),
    ]


def k6_rest(settings: config.Settings, token: str, account_id: str, concurrency: int, requests: int) -> dict[str, Any]:
    k6 = Path(settings.stack_dir) / "bin" / "k6"
    script = f"""
import http from 'k6/http';
export const options = {{ vus: {concurrency}, iterations: {requests} }};
export default function () {{
  const r = http.get('http://127.0.0.1:{settings.envoy_port}/v1/accounts/{account_id}',
                     {{ headers: {{ authorization: 'Bearer {token}' }} }});
  if (r.status !== 200) {{ throw new Error('status ' + r.status); }}
}}
"""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "script.js").write_text(script)
        summary = Path(folder) / "summary.json"
        subprocess.run([str(k6), "run", "--quiet", "--no-color", "--summary-export", str(summary),
                        str(Path(folder) / "script.js")], check=True, timeout=600, stdout=subprocess.DEVNULL)
        metrics = json.loads(summary.read_text())["metrics"]
    duration = metrics["http_req_duration"]
    return {"call": "REST GET /v1/accounts/{account_id}", "concurrency": concurrency, "requests": requests,
            "rps": round(metrics["http_reqs"]["rate"], 1), "p50_ms": round(duration["med"], 2),
            "p99_ms": round(duration.get("p(99)", duration.get("p(95)", 0.0)), 2),
            "failed": metrics["http_req_failed"]["value"] if "value" in metrics["http_req_failed"] else None}


def chart(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["call"].split("/")[-1] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 7))
    left.barh(names, [r["rps"] for r in results], color="#1f77b4")
    left.set_title("throughput (requests/s)")
    left.invert_yaxis()
    right.barh(names, [r["p99_ms"] for r in results], color="#d62728", label="p99")
    right.barh(names, [r["p50_ms"] for r in results], color="#ff7f0e", label="p50")
    right.set_title("latency (ms)")
    right.invert_yaxis()
    right.legend()
    fig.suptitle("Simple Bank: every public RPC through Envoy (2 cores, load generator on the same machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    settings = config.load()
    results = []
    for call, data, token, share in scenarios(settings):
        # Login costs ~15 ms of argon2id CPU per request: a fixed, smaller count keeps the run short.
        count = args.requests if share else max(args.concurrency * 4, 40)
        result = ghz(settings, call, data, token, args.concurrency, count)
        print(f"  {call:<58} {result['rps']:>8.1f}/s  p50 {result['p50_ms']:>7.2f} ms  p99 {result['p99_ms']:>7.2f} ms"
              f"  {result['status_codes']}", file=sys.stderr)
        results.append(result)
    customer = onboard(settings)
    account_id = rest(settings, "POST", "/v1/accounts", {"currency": "USD"}, token=customer.token).body["account_id"]
    results.append(k6_rest(settings, customer.token, account_id, args.concurrency, args.requests))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"rpcs-{stamp}.json").write_text(json.dumps({"skipped": SKIPPED, "results": results}, indent=2))
    chart(results, RESULTS / f"rpcs-{stamp}.png")
    print(f"written perf/results/rpcs-{stamp}.json and .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

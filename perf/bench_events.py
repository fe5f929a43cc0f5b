"""Benchmark of the asynchronous half: end-to-end lag from a committed transfer to (1) its line in
the receiver's statement (ListAccountActivity, svc_account's Cassandra projection) and (2) the
receiver's email in Mailpit (svc_notify), p50/p99, under a steady background load of transfers.

The clock starts when CreateTransfer returns (the ledger has committed by then), so a lag is the
relay's wake-up + Kafka + the consumer + Cassandra or SMTP + this poller's interval (POLL_S).
Run against the local stack (`make up` first) with `make bench-events`; loopback only. Bounded:
a fixed number of samples, each given at most SAMPLE_TIMEOUT_S. Writes JSON to
perf/results/events-<time>.json and prints it.

Mailpit's search slows down with the number of messages it holds (measured: 3 ms empty, 270 ms
at 100,000), and this poller searches it every POLL_S: for comparable numbers empty it first
(`curl -X DELETE http://127.0.0.1:8025/api/v1/messages`; the local sink only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import uuid
from typing import Any

from common import config
from common.config import REPO_ROOT
from tests.events_support import Holder, deposit, holder, teller_token
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--background-rate", type=float, default=50.0, help="background transfers per second")
    args = parser.parse_args()
    if not 1 <= args.samples <= 10_000 or not 0 <= args.background_rate <= 1000:
        parser.error("samples must be 1..10000 and background-rate 0..1000")
    settings = config.load()
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
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"events-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sustained load on the whole bank: does the asynchronous half keep up with the ledger?

An open model (k6 constant-arrival-rate: transfers arrive at a set rate whether or not the bank
keeps up) of REST transfers through Envoy between many real customers (registered, verified,
logged in: each transfer is two statement lines and two emails), every consumer running. The
rate steps up, STEP_S (60 s) per step. At each step:
  - commit -> statement line and commit -> email, p50/p99, of the events handled during the
    step: the consumers' histogram consumer_event_age_seconds (from the MoneyMoved's
    create_time, the ledger's commit, to the end of its handling: the lines written, the
    emails accepted by the mail server), read from each process's /metrics before and after;
  - the backlog (records of bank.transfer.v1 not yet handled, per consumer group, plus the
    outbox rows not yet published), sampled every SAMPLE_S, and whether it grew over the step
    (by more than two seconds of arrivals);
  - what k6 achieved (transfers/s, dropped arrivals, errors).
The headline is the highest rate at which, over the step, statement p99 <= 1 s, email p99 <=
5 s, the backlog did not grow and k6 delivered the rate. Measured in the same run, for
comparison: Mailpit's own intake ceiling (perf.bench_events ceiling), and the ledger alone
through REST (k6, 16 clients, closed model, svc_account and svc_notify stopped), last, after
which those two are started again and drain what that run left them.

    make bench-sustained   (or: .venv/bin/python -m perf.bench_sustained [--rates 25,50,100,150]
                            [--step-s 60] [--people 40])

Needs the stack up (`make up`) and k6 (`make tools`). Loopback only, bounded (each step ends
after its time; the whole run after about (steps + 2) minutes). Empties Mailpit (the local sink)
before it starts. Writes perf/results/sustained-<time>.json and .png (and sustained-latest.*).
2 CPU cores: k6, the bank and its dependencies share them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import config
from common.consumer import EVENT_AGE
from devstack.stack import Stack
from perf.bench_events import empty_mailpit, mailpit_ceiling, people, wait_caught_up
from tests.events_support import Holder, metric_samples, service_metric

RESULTS = config.REPO_ROOT / "perf" / "results"
BIN = Path(config.load().stack_dir) / "bin"
STEP_S = 60
SAMPLE_S = 2.0
FUNDS = 10**12  # transfers of 1 never run short
STATEMENT_P99_MAX_S = 1.0
EMAIL_P99_MAX_S = 5.0
LEDGER_ONLY_S = 10
LEDGER_ONLY_CLIENTS = 16
K6_TIMEOUT_S = 120
MONEY_MOVED = "bank.events.v1.MoneyMoved"
GROUPS = {"statement": ("account", "svc_account"), "email": ("notify", "svc_notify.transfer")}
BUCKETS = [b for b in EVENT_AGE._upper_bounds]  # noqa: SLF001  # the histogram's own bucket bounds

K6_SCRIPT = """
import http from 'k6/http';
import { check } from 'k6';
import { SharedArray } from 'k6/data';

const pairs = new SharedArray('pairs', () => JSON.parse(open(__ENV.PAIRS)));
const url = `http://127.0.0.1:${__ENV.PORT}/v1/transfers`;
const open_model = __ENV.MODE === 'open';

export const options = {
  discardResponseBodies: true,
  summaryTrendStats: ['avg', 'med', 'p(99)', 'max'],
  scenarios: open_model ? {
    step: { executor: 'constant-arrival-rate', rate: Number(__ENV.RATE), timeUnit: '1s', duration: `${__ENV.SECONDS}s`,
            preAllocatedVUs: Number(__ENV.VUS), maxVUs: Number(__ENV.VUS) * 4 },
  } : {
    closed: { executor: 'constant-vus', vus: Number(__ENV.VUS), duration: `${__ENV.SECONDS}s` },
  },
};

export default function () {
  const [from, to, token] = pairs[Math.floor(Math.random() * pairs.length)];
  const body = JSON.stringify({ request_id: `sustained-${crypto.randomUUID()}`, from_account_id: from,
                                to_account_id: to, amount: '1', currency: 'USD' });
  const response = http.post(url, body, { headers: { 'Content-Type': 'application/json',
                                                     Authorization: `Bearer ${token}` }, timeout: '10s' });
  check(response, { 'status 200': (r) => r.status === 200 });
}

export function handleSummary(data) {
  return { [__ENV.SUMMARY]: JSON.stringify(data) };
}
"""


@dataclass
class Step:
    rate: int  # transfers/s offered
    seconds: int
    achieved_per_s: float = 0.0
    dropped: int = 0  # arrivals k6 could not start (no free VU): the bank answered too slowly
    errors: int = 0
    rest_p99_ms: float = 0.0
    lag_s: dict[str, dict[str, float]] = field(default_factory=dict)  # statement/email -> p50, p99, count
    backlog: dict[str, float] = field(default_factory=dict)  # start, end, growth, max
    backlog_grew: bool = False
    keeps_up: bool = False


def histogram(settings: config.Settings, service: str, group: str) -> list[float]:
    """Cumulative bucket counts of consumer_event_age_seconds for MoneyMoved in the group,
    summed over the service's processes, in BUCKETS order."""
    counts = dict.fromkeys(BUCKETS, 0.0)
    for index in range(settings.processes(service)):
        for name, labels, value in metric_samples(settings.metrics_port(service, index)):
            if (name == "consumer_event_age_seconds_bucket" and labels.get("group") == group
                    and labels.get("event_type") == MONEY_MOVED):
                counts[float(labels["le"])] += value
    return [counts[b] for b in BUCKETS]


def quantile(before: list[float], after: list[float], q: float) -> float | None:
    """The q-quantile (seconds) of the observations between two readings of a cumulative
    histogram, interpolated linearly inside its bucket (exact at the bucket bounds, which include
    the 1 s and 5 s the headline judges by)."""
    counts = [a - b for a, b in zip(after, before, strict=True)]
    total = counts[-1]
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in zip(BUCKETS, counts, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            inside = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / inside if inside else 1.0)
        lower_bound, lower_count = bound, count
    return lower_bound


def backlog(settings: config.Settings) -> dict[str, float]:
    """Events not yet handled: per consumer group (records), and outbox rows not yet published."""
    found = {kind: service_metric(settings, service, "consumer_lag_records", group=group, topic="bank.transfer.v1")
             for kind, (service, group) in GROUPS.items()}
    found["outbox"] = service_metric(settings, "transfer", "outbox_backlog")
    return found


class Sampler:
    """Every SAMPLE_S: the backlog and the lag histograms, for the chart."""

    def __init__(self, settings: config.Settings, started: float) -> None:
        self._settings = settings
        self._started = started
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.samples: list[dict[str, Any]] = []

    def take(self) -> dict[str, Any]:
        sample = {"t": round(time.monotonic() - self._started, 2), "backlog": backlog(self._settings),
                  "histograms": {kind: histogram(self._settings, service, group)
                                 for kind, (service, group) in GROUPS.items()}}
        self.samples.append(sample)
        return sample

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.take()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def run_k6(workdir: Path, settings: config.Settings, pairs_file: Path, mode: str, seconds: int, rate: int,
           vus: int) -> dict[str, Any]:
    script, summary = workdir / "sustained.js", workdir / f"k6-{mode}-{rate}.json"
    script.write_text(K6_SCRIPT)
    env = dict(os.environ, PAIRS=str(pairs_file), PORT=str(settings.envoy_port), MODE=mode, RATE=str(rate),
               SECONDS=str(seconds), VUS=str(vus), SUMMARY=str(summary), K6_NO_USAGE_REPORT="true")
    subprocess.run([str(BIN / "k6"), "run", "--quiet", "--no-color", str(script)], check=True, env=env,
                   timeout=seconds + K6_TIMEOUT_S, stdout=subprocess.DEVNULL)
    metrics = json.loads(summary.read_text())["metrics"]
    return {"per_s": metrics["http_reqs"]["values"]["rate"], "count": metrics["http_reqs"]["values"]["count"],
            "dropped": int(metrics.get("dropped_iterations", {}).get("values", {}).get("count", 0)),
            "errors": int(metrics["checks"]["values"].get("fails", 0)),
            "p50_ms": metrics["http_req_duration"]["values"]["med"],
            "p99_ms": metrics["http_req_duration"]["values"]["p(99)"]}


def run_step(workdir: Path, settings: config.Settings, pairs_file: Path, sampler: Sampler, rate: int,
             seconds: int) -> Step:
    step = Step(rate, seconds)
    first = sampler.take()
    k6 = run_k6(workdir, settings, pairs_file, "open", seconds, rate, vus=max(20, rate // 5))
    last = sampler.take()
    step.achieved_per_s = round(k6["per_s"], 1)
    step.dropped, step.errors, step.rest_p99_ms = k6["dropped"], k6["errors"], round(k6["p99_ms"], 1)
    for kind in GROUPS:
        before, after = first["histograms"][kind], last["histograms"][kind]
        p50, p99 = quantile(before, after, 0.50), quantile(before, after, 0.99)
        step.lag_s[kind] = {"p50": round(p50, 3) if p50 is not None else -1.0,
                            "p99": round(p99, 3) if p99 is not None else -1.0, "events": after[-1] - before[-1]}
    window = [s for s in sampler.samples if first["t"] <= s["t"] <= last["t"]]
    total = [sum(s["backlog"].values()) for s in window]
    step.backlog = {"start": total[0], "end": total[-1], "max": max(total), "growth": total[-1] - total[0],
                    **{f"end_{k}": v for k, v in last["backlog"].items()}}
    step.backlog_grew = step.backlog["growth"] > 2 * rate
    step.keeps_up = (0 <= step.lag_s["statement"]["p99"] <= STATEMENT_P99_MAX_S
                     and 0 <= step.lag_s["email"]["p99"] <= EMAIL_P99_MAX_S
                     and not step.backlog_grew
                     and step.achieved_per_s >= 0.95 * rate and step.errors <= 0.001 * rate * seconds)
    return step


def chart(steps: list[Step], samples: list[dict[str, Any]], boundaries: list[float], png: Path,
          headline: int | None, ceiling: float | None, ledger_only: float | None, step_s: int) -> None:
    import matplotlib  # noqa: PLC0415  # only the chart needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, (lags, queue) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    times = [s["t"] for s in samples[1:]]
    for kind, colour in (("statement", "tab:blue"), ("email", "tab:orange")):
        p99 = [quantile(a["histograms"][kind], b["histograms"][kind], 0.99) for a, b in zip(samples, samples[1:], strict=False)]
        lags.plot(times, [v if v is not None else float("nan") for v in p99], color=colour,
                  label=f"commit -> {kind}, p99 of the last {SAMPLE_S:.0f} s")
    lags.axhline(STATEMENT_P99_MAX_S, color="tab:blue", linestyle=":", linewidth=1)
    lags.axhline(EMAIL_P99_MAX_S, color="tab:orange", linestyle=":", linewidth=1)
    lags.set_yscale("log")
    lags.set_ylabel("lag (s)")
    lags.legend(loc="upper left", fontsize=8)
    for kind, colour in (("statement", "tab:blue"), ("email", "tab:orange"), ("outbox", "tab:gray")):
        queue.plot([s["t"] for s in samples], [s["backlog"][kind] for s in samples], color=colour,
                   label=f"backlog: {kind}" + (" (rows not yet published)" if kind == "outbox" else " (records)"))
    queue.set_ylabel("events waiting")
    queue.set_xlabel("seconds since the first step")
    queue.legend(loc="upper left", fontsize=8)
    for axis in (lags, queue):
        for step, start, end in zip(steps, boundaries, boundaries[1:], strict=False):
            axis.axvspan(start, end, color="tab:green" if step.keeps_up else "tab:red", alpha=0.06)
    for step, start in zip(steps, boundaries, strict=False):
        lags.text(start + 1, lags.get_ylim()[1] * 0.5, f"{step.rate}/s", fontsize=8)
    title = f"Sustained transfers (open model, {step_s} s steps): keeps up to {headline or 'none'}/s"
    if ceiling:
        title += f"; Mailpit ceiling {ceiling:.0f} msg/s"
    if ledger_only:
        title += f"; ledger alone (REST) {ledger_only:.0f}/s"
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(png, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="25,50,100,150,200", help="transfers/s per step, rising")
    parser.add_argument("--step-s", type=int, default=STEP_S)
    parser.add_argument("--people", type=int, default=40, help="real customers the transfers are between")
    parser.add_argument("--ceiling-messages", type=int, default=2000, help="per Mailpit measurement (0: skip)")
    parser.add_argument("--no-ledger-only", action="store_true", help="skip the ledger-only REST run")
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    if not all(1 <= r <= 2000 for r in rates) or not 5 <= args.step_s <= 300 or not 2 <= args.people <= 500 \
            or len(rates) > 10:
        parser.error("rates 1..2000 (at most 10), step-s 5..300, people 2..500")
    settings = config.load()
    if not (BIN / "k6").exists():
        raise SystemExit("no k6 in .stack/bin: run `make tools`")
    stack = Stack(settings)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")

    empty_mailpit(settings)  # its search (the verification codes below) slows down as it fills
    print(f"{args.people} customers, registered, verified and funded...", file=sys.stderr)
    crowd: list[Holder] = people(settings, args.people, FUNDS)
    wait_caught_up(settings)
    ceiling = mailpit_ceiling(settings, args.ceiling_messages) if args.ceiling_messages else None
    if ceiling:
        print(f"Mailpit's own intake: {ceiling}", file=sys.stderr)
    empty_mailpit(settings)

    with tempfile.TemporaryDirectory(prefix="bench-sustained-") as tmp:
        workdir = Path(tmp)
        pairs_file = workdir / "pairs.json"
        pairs_file.write_text(json.dumps([[a.account_id, b.account_id, a.token]
                                          for a in crowd for b in crowd if a is not b]))
        steps: list[Step] = []
        boundaries: list[float] = []
        started = time.monotonic()
        with Sampler(settings, started) as sampler:
            sampler.take()
            for rate in rates:
                boundaries.append(time.monotonic() - started)
                step = run_step(workdir, settings, pairs_file, sampler, rate, args.step_s)
                steps.append(step)
                print(f"  {rate:5d}/s offered: {step.achieved_per_s:7.1f}/s done, dropped {step.dropped}, "
                      f"errors {step.errors}; statement p50/p99 {step.lag_s['statement']['p50']}/"
                      f"{step.lag_s['statement']['p99']} s, email p50/p99 {step.lag_s['email']['p50']}/"
                      f"{step.lag_s['email']['p99']} s; backlog {step.backlog['start']:.0f} -> "
                      f"{step.backlog['end']:.0f}{' GREW' if step.backlog_grew else ''}"
                      f"{'  keeps up' if step.keeps_up else ''}", file=sys.stderr, flush=True)
            boundaries.append(time.monotonic() - started)
            samples = list(sampler.samples)

        ledger_only = None
        if not args.no_ledger_only:
            # Last: the two consumers are stopped for it and started again after; they then drain
            # what it left them, after the bench (their committed offsets: nothing is lost).
            stack.down(["svc_notify", "svc_account"])
            try:
                ledger_only = run_k6(workdir, settings, pairs_file, "closed", LEDGER_ONLY_S, 0, LEDGER_ONLY_CLIENTS)
            finally:
                asyncio.run(stack.up(["svc_notify", "svc_account"]))
            print(f"ledger alone, REST, {LEDGER_ONLY_CLIENTS} clients: {ledger_only['per_s']:.0f}/s", file=sys.stderr)

    keeping_up = [s.rate for s in steps if s.keeps_up]
    # The highest rate of an unbroken run from the first step: one lucky step above a failing
    # one is not a rate the bank keeps up with.
    headline = None
    for step in steps:
        if not step.keeps_up:
            break
        headline = step.rate
    report = {
        "time": stamp, "cpu_cores": os.cpu_count(), "people": args.people, "step_s": args.step_s,
        "notify_processes": settings.processes("notify"), "account_processes": settings.processes("account"),
        "transfer_processes": settings.processes("transfer"), "smtp_connections": settings.smtp_connections,
        "criteria": {"statement_p99_max_s": STATEMENT_P99_MAX_S, "email_p99_max_s": EMAIL_P99_MAX_S,
                     "backlog_growth_max": "2 s of arrivals", "achieved_min": "95% of the rate"},
        "headline_transfers_per_s": headline, "rates_kept_up": keeping_up,
        "headline_emails_per_s": 2 * headline if headline else None,
        "mailpit": ceiling, "ledger_only_rest": ledger_only,
        "steps": [step.__dict__ for step in steps],
        "samples": [{"t": s["t"], "backlog": s["backlog"]} for s in samples],
    }
    json_path, png_path = RESULTS / f"sustained-{stamp}.json", RESULTS / f"sustained-{stamp}.png"
    json_path.write_text(json.dumps(report, indent=2))
    chart(steps, samples, boundaries, png_path, headline, ceiling["ceiling_messages_per_s"] if ceiling else None,
          ledger_only["per_s"] if ledger_only else None, args.step_s)
    shutil.copyfile(json_path, RESULTS / "sustained-latest.json")
    shutil.copyfile(png_path, RESULTS / "sustained-latest.png")
    print(json.dumps({k: v for k, v in report.items() if k not in ("samples",)}, indent=2))
    print(f"headline: keeps up with {headline} transfers/s; written to {json_path} and {png_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of account recovery (issue #13), through Envoy against the running stack:

1. Throughput of Login and of ResetPassword (gRPC through Envoy, CONCURRENCY clients for
   DURATION_S each). Both are argon2id-bound: Login verifies a hash, ResetPassword makes one.
   Each ResetPassword client owns a customer whose reset code is set straight in svc_customer's
   table before each call (the HMAC under the service's key, as the service stores it), so the
   measured calls are all successful resets and nothing waits for email.
2. Known against unknown addresses: RequestPasswordReset, ResendVerificationCode and a wrong
   Login (REST, one call at a time, known and unknown interleaved at random): the latency of
   each kind, to show that timing does not tell which addresses or usernames exist. The
   per-email and per-username limits are reset between calls (their Redis keys deleted), or
   they would end the run after 3 calls per address.

Run with `flock /tmp/bank-bench.lock .venv/bin/python -m perf.bench_recovery` against the running
stack (`make up`). Writes JSON to
perf/results/recovery-<time>.json and prints a summary. Bounded: fixed durations and counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import psycopg
import redis
import redis.asyncio as aioredis
from bank.auth.v1 import auth_pb2, auth_pb2_grpc

from common import auth, config, ratelimit
from common.config import REPO_ROOT
from svc_customer import service as customer_service
from svc_customer.service import Throttle
from tests.support import STRONG_PASSWORD, Customer, onboard, register, rest, unique_email

RESULTS = REPO_ROOT / "perf" / "results"
CONCURRENCY = 16
DURATION_S = 15.0
SAMPLES_PER_KIND = 150
NEW_PASSWORDS = ["recovery-bench-passphrase-a", "recovery-bench-passphrase-b"]


def _summary(latencies_ms: list[float]) -> dict[str, float]:
    ordered = sorted(latencies_ms)
    return {"n": len(ordered), "p50_ms": round(statistics.median(ordered), 2),
            "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 2),
            "mean_ms": round(statistics.fmean(ordered), 2)}


async def _throughput(settings: config.Settings, name: str, customers: list[Customer],
                      call: Any) -> dict[str, Any]:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    deadline = time.perf_counter() + DURATION_S

    async def client(index: int, stub: auth_pb2_grpc.AuthServiceStub) -> None:
        round_ = 0
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                await call(stub, customers[index], round_)
                latencies.append((time.perf_counter() - started) * 1000)
            except grpc.aio.AioRpcError as error:
                errors[error.code().name] = errors.get(error.code().name, 0) + 1
            round_ += 1

    async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.envoy_port}") as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        started = time.perf_counter()
        await asyncio.gather(*(client(i, stub) for i in range(len(customers))))
        elapsed = time.perf_counter() - started
    return {"rpc": name, "concurrency": len(customers), "duration_s": round(elapsed, 1),
            "rps": round(len(latencies) / elapsed, 1), **_summary(latencies or [0.0]), "errors": errors}


def _reset_code_hash(settings: config.Settings, email: str, code: str) -> bytes:
    """As svc_customer stores it."""
    return customer_service.Codes(auth.load_keys(settings, signing=False).service_token).password_reset(email, code)


async def throughput(settings: config.Settings, customers: list[Customer]) -> list[dict[str, Any]]:
    passwords = {c.customer_id: STRONG_PASSWORD for c in customers}

    async def login(stub: auth_pb2_grpc.AuthServiceStub, customer: Customer, _: int) -> None:
        await stub.Login(auth_pb2.LoginRequest(username=customer.username, password=passwords[customer.customer_id]),
                         timeout=30)

    code = "424242"
    hashes = {c.email: _reset_code_hash(settings, c.email, code) for c in customers}
    conn = await psycopg.AsyncConnection.connect(settings.pg_conninfo, autocommit=True)

    async def reset(stub: auth_pb2_grpc.AuthServiceStub, customer: Customer, round_: int) -> None:
        # A fresh live code for this customer (outside the timed call's server work, but inside
        # the client's loop: it is one small UPSERT on another connection).
        await conn.execute(
            "INSERT INTO customer.password_resets (email, customer_id, code_hash, expire_time)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT (email) DO UPDATE SET code_hash = excluded.code_hash,"
            " expire_time = excluded.expire_time, failed_attempts = 0, used_time = NULL",
            (customer.email, customer.customer_id, hashes[customer.email], datetime.now(UTC) + timedelta(minutes=15)))
        new_password = NEW_PASSWORDS[round_ % 2]
        await stub.ResetPassword(auth_pb2.ResetPasswordRequest(email=customer.email, code=code,
                                                               new_password=new_password), timeout=30)
        passwords[customer.customer_id] = new_password

    try:
        results = [await _throughput(settings, "AuthService.Login", customers, login)]
        results.append(await _throughput(settings, "AuthService.ResetPassword", customers, reset))
    finally:
        await conn.close()
    return results


def timing(settings: config.Settings, known: list[Customer], unverified: list[str]) -> list[dict[str, Any]]:
    """Latency of known against unknown addresses, one call at a time, interleaved at random."""
    # svc_customer's own limits, for their key names only (nothing is sent through this client).
    throttle = Throttle.from_settings(ratelimit.SlidingWindow(aioredis.Redis()), settings)
    redis_client = redis.Redis(host=settings.redis_host, port=settings.redis_port)
    unknown = [unique_email("nobody") for _ in known]
    unknown_users = [f"nobody-{uuid.uuid4().hex[:12]}" for _ in known]
    kinds: dict[str, tuple[Any, list[Any], list[Any]]] = {
        "RequestPasswordReset": (
            lambda email: (rest(settings, "POST", "/v1/credentials:requestPasswordReset", {"email": email}),
                           [ratelimit.Count(throttle.reset_by_email, email)]),
            [c.email for c in known], unknown),
        "ResendVerificationCode": (
            lambda email: (rest(settings, "POST", "/v1/customers:resendVerificationCode", {"email": email}),
                           [ratelimit.Count(throttle.resend_by_email, email)]),
            unverified, unknown),
        "Login (wrong password)": (
            lambda username: (rest(settings, "POST", "/v1/sessions", {"username": username,
                                                                      "password": "not-the-password"}),
                              throttle.login_counts(username, "127.0.0.1")[:2]),
            [c.username for c in known], unknown_users),
    }
    results = []
    for name, (call, known_subjects, unknown_subjects) in kinds.items():
        samples: dict[str, list[float]] = {"known": [], "unknown": []}
        statuses: dict[str, set[int]] = {"known": set(), "unknown": set()}
        order = ["known", "unknown"] * SAMPLES_PER_KIND
        random.shuffle(order)
        for i, which in enumerate(order):
            subject = (known_subjects if which == "known" else unknown_subjects)[i % len(known_subjects)]
            started = time.perf_counter()
            response, counts = call(subject)
            samples[which].append((time.perf_counter() - started) * 1000)
            statuses[which].add(response.status)
            redis_client.delete(*(c.key for c in counts))
        known_summary, unknown_summary = _summary(samples["known"]), _summary(samples["unknown"])
        results.append({"rpc": name, "known": known_summary, "unknown": unknown_summary,
                        "statuses": {k: sorted(v) for k, v in statuses.items()},
                        "p50_difference_ms": round(known_summary["p50_ms"] - unknown_summary["p50_ms"], 2)})
    redis_client.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.parse_args()
    settings = config.load()
    customers = [onboard(settings) for _ in range(CONCURRENCY)]
    unverified = [register(settings)["email"] for _ in range(CONCURRENCY)]
    # Throughput first: the timing part sends hundreds of emails, which keep svc_notify busy.
    report: dict[str, Any] = {"time": datetime.now(UTC).isoformat(timespec="seconds"),
                              "throughput": asyncio.run(throughput(settings, customers))}
    report["timing"] = timing(settings, customers, unverified)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"recovery-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    for row in report["throughput"]:
        print(f"{row['rpc']:28} {row['rps']:7.1f}/s  p50 {row['p50_ms']:7.1f} ms  p90 {row['p90_ms']:7.1f} ms"
              f"  ({row['concurrency']} clients, {row['duration_s']} s, errors {row['errors']})")
    for row in report["timing"]:
        k, u = row["known"], row["unknown"]
        print(f"{row['rpc']:28} known p50 {k['p50_ms']:6.2f} ms p90 {k['p90_ms']:6.2f} | unknown p50 {u['p50_ms']:6.2f}"
              f" ms p90 {u['p90_ms']:6.2f} | p50 difference {row['p50_difference_ms']:+.2f} ms  statuses {row['statuses']}")
    print(f"written to {out.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()

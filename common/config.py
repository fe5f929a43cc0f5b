"""The one configuration loader: every setting of the bank comes from an environment variable.

Each setting is declared once below with its variable name, its default for the local stack
and a line of documentation; `python -m devstack env` prints the table, and the README's
configuration section is that table. Services and the stack launcher read the same object, so
a port changed in the environment moves both the process and everything that talks to it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
PROCESS_PORT_STEP = 100
# Secrets whose defaults exist for the local stack only. A deployment that does not generate
# local keys (BANK_TOKEN_GENERATE_LOCAL_KEYS=false: Kubernetes, any real environment) must set
# every one of them; a service refuses to start with a local default there.
LOCAL_ONLY_SECRETS = ("pg_password", "teller_password")
# Each node's connection attempt in HA mode (libpq's connect_timeout, whole seconds, 2 at least).
PG_CONNECT_TIMEOUT_S = 3


def _setting(env: str, default: Any, doc: str) -> Any:
    return field(default=default, metadata={"env": env, "doc": doc})


@dataclass(frozen=True)
class Settings:
    # Where the local stack keeps its data, logs, pids and downloads (git-ignored).
    stack_dir: str = _setting("BANK_STACK_DIR", str(REPO_ROOT / ".stack"), "local stack state: data, logs, pids, downloads")
    # Interface the bank's own processes listen on; containers set 0.0.0.0.
    bind_host: str = _setting("BANK_BIND_HOST", "127.0.0.1", "interface the services, Envoy and infra listen on")
    log_level: str = _setting("BANK_LOG_LEVEL", "INFO", "default log level of every service (per service: BANK_<SERVICE>_LOG_LEVEL)")

    pg_host: str = _setting("BANK_PG_HOST", "127.0.0.1", "PostgreSQL host")
    pg_port: int = _setting("BANK_PG_PORT", 5432, "PostgreSQL port")
    pg_user: str = _setting("BANK_PG_USER", "bank", "PostgreSQL user")
    pg_password: str = _setting("BANK_PG_PASSWORD", "bank-local-password", "PostgreSQL password (local default only)")
    pg_database: str = _setting("BANK_PG_DATABASE", "bank", "PostgreSQL database; each service owns one schema in it")
    pg_pool_min: int = _setting("BANK_PG_POOL_MIN", 2, "connections each service process keeps open")
    pg_pool_max: int = _setting("BANK_PG_POOL_MAX", 10, "connections each service process may open at most")
    # The HA mode (README, Ports; issue #19): N Patroni-managed nodes, node i on
    # pg_port + i with its Patroni REST API on patroni_port + i, replicated synchronously, with
    # etcd holding the leader key. 1 is one plain PostgreSQL on pg_port.
    pg_nodes: int = _setting("BANK_PG_NODES", 1, "PostgreSQL nodes: 1 is one plain server on BANK_PG_PORT; 3 is a "
                             "Patroni cluster, node i on BANK_PG_PORT + i, synchronous, failing over by itself")
    patroni_port: int = _setting("BANK_PATRONI_PORT", 8008, "Patroni REST API of node i: this + i (HA mode only)")
    etcd_members: int = _setting("BANK_ETCD_MEMBERS", 1, "etcd members holding the Patroni cluster's state (HA mode "
                                 "only): 1, or 3 to survive the loss of one")
    etcd_port: int = _setting("BANK_ETCD_PORT", 2379, "etcd client port of the first member; member j listens on "
                              "this + 2j for clients and this + 2j + 1 for peers (HA mode only)")

    redis_host: str = _setting("BANK_REDIS_HOST", "127.0.0.1", "Redis host")
    redis_port: int = _setting("BANK_REDIS_PORT", 6379, "Redis port")

    kafka_bootstrap: str = _setting("BANK_KAFKA_BOOTSTRAP", "127.0.0.1:9092", "Kafka bootstrap servers")
    kafka_controller_port: int = _setting("BANK_KAFKA_CONTROLLER_PORT", 9093, "Kafka KRaft controller port (local stack)")
    # 1 on the local stack's one broker; a real cluster wants 3 (with min.insync.replicas 2).
    kafka_replication_factor: int = _setting("BANK_KAFKA_REPLICATION_FACTOR", 1,
                                             "replication factor of the bank's Kafka topics (1: one local broker)")
    kafka_version: str = _setting("BANK_KAFKA_VERSION", "4.1.2", "Apache Kafka version fetched from Maven Central")

    cassandra_host: str = _setting("BANK_CASSANDRA_HOST", "127.0.0.1", "Cassandra host")
    cassandra_port: int = _setting("BANK_CASSANDRA_PORT", 9042, "Cassandra CQL port")
    cassandra_storage_port: int = _setting("BANK_CASSANDRA_STORAGE_PORT", 7000, "Cassandra internode port (local stack)")
    cassandra_version: str = _setting("BANK_CASSANDRA_VERSION", "5.0.6", "Apache Cassandra version fetched from Maven Central")
    cassandra_local_dc: str = _setting("BANK_CASSANDRA_LOCAL_DC", "datacenter1", "Cassandra data center the services use")
    cassandra_replication_factor: int = _setting("BANK_CASSANDRA_REPLICATION_FACTOR", 1,
                                                 "replication factor of the bank's keyspaces (1: one local node)")
    cassandra_heap_mb: int = _setting("BANK_CASSANDRA_HEAP_MB", 1024, "Cassandra JVM heap (local stack)")

    smtp_host: str = _setting("BANK_SMTP_HOST", "127.0.0.1", "SMTP server host (Mailpit locally)")
    smtp_port: int = _setting("BANK_SMTP_PORT", 1025, "SMTP server port")
    smtp_user: str = _setting("BANK_SMTP_USER", "", "SMTP user (empty: no authentication)")
    smtp_password: str = _setting("BANK_SMTP_PASSWORD", "", "SMTP password")
    smtp_connections: int = _setting("BANK_SMTP_CONNECTIONS", 8, "SMTP connections each svc_notify process keeps open "
                                     "and sends on at once (persistent, one message at a time each)")
    mailpit_http_port: int = _setting("BANK_MAILPIT_HTTP_PORT", 8025, "Mailpit web UI and HTTP API port")

    otel_endpoint: str = _setting("BANK_OTEL_ENDPOINT", "", "OTLP/gRPC collector that traces go to, e.g. "
                                  "http://127.0.0.1:4317 (empty: OTEL_EXPORTER_OTLP_ENDPOINT if set, else tracing is off)")
    prometheus_port: int = _setting("BANK_PROMETHEUS_PORT", 9090, "Prometheus web and API port")
    envoy_port: int = _setting("BANK_ENVOY_PORT", 8080, "public gateway: REST/JSON and gRPC")
    envoy_admin_port: int = _setting("BANK_ENVOY_ADMIN_PORT", 9901, "Envoy admin (loopback only)")
    envoy_route_timeout_s: float = _setting("BANK_ENVOY_ROUTE_TIMEOUT_S", 10.0, "timeout of every Envoy route")
    envoy_tls_port: int = _setting("BANK_ENVOY_TLS_PORT", 8443, "public gateway over TLS: REST/JSON and gRPC, same routes")
    web_port: int = _setting("BANK_WEB_PORT", 8070, "the customer web app's static files (devstack.web), behind Envoy's / route")
    tls_cert_file: str = _setting("BANK_TLS_CERT_FILE", "", "certificate chain (PEM) Envoy serves on the TLS port "
                                  "(empty: a local CA's certificate for localhost, made by devstack in <stack_dir>/tls)")
    tls_key_file: str = _setting("BANK_TLS_KEY_FILE", "", "private key (PEM) of BANK_TLS_CERT_FILE (empty: devstack's)")
    # Envoy's token bucket, one per listener (8080, 8443) for all of its requests: a flood guard well
    # above the bank's measured peak (~900 requests/s), not a per-client quota.
    envoy_rate_limit_rps: int = _setting("BANK_ENVOY_RATE_LIMIT_RPS", 2000, "requests/s each Envoy listener admits (refill)")
    envoy_rate_limit_burst: int = _setting("BANK_ENVOY_RATE_LIMIT_BURST", 2000,
                                           "requests each Envoy listener admits at once (bucket)")

    customer_grpc_port: int = _setting("BANK_CUSTOMER_GRPC_PORT", 50051, "svc_customer gRPC port")
    account_grpc_port: int = _setting("BANK_ACCOUNT_GRPC_PORT", 50052, "svc_account gRPC port")
    transfer_grpc_port: int = _setting("BANK_TRANSFER_GRPC_PORT", 50053, "svc_transfer gRPC port")
    notify_grpc_port: int = _setting("BANK_NOTIFY_GRPC_PORT", 50054, "svc_notify gRPC port")
    customer_metrics_port: int = _setting("BANK_CUSTOMER_METRICS_PORT", 9101, "svc_customer Prometheus metrics port")
    account_metrics_port: int = _setting("BANK_ACCOUNT_METRICS_PORT", 9102, "svc_account Prometheus metrics port")
    transfer_metrics_port: int = _setting("BANK_TRANSFER_METRICS_PORT", 9103, "svc_transfer Prometheus metrics port")
    notify_metrics_port: int = _setting("BANK_NOTIFY_METRICS_PORT", 9104, "svc_notify Prometheus metrics port")
    # Processes per service (both cores): each binds the service's port with SO_REUSEPORT and its
    # own private port (grpc_port + 100 * (index + 1)), which Envoy balances across; process i
    # serves metrics on metrics_port + 100 * i.
    customer_processes: int = _setting("BANK_CUSTOMER_PROCESSES", 1, "svc_customer processes")
    account_processes: int = _setting("BANK_ACCOUNT_PROCESSES", 1, "svc_account processes")
    transfer_processes: int = _setting("BANK_TRANSFER_PROCESSES", 2, "svc_transfer processes")
    notify_processes: int = _setting("BANK_NOTIFY_PROCESSES", 1, "svc_notify processes")
    # Where a service reaches another service's gRPC port (internal RPCs, never through Envoy).
    customer_addr: str = _setting("BANK_CUSTOMER_ADDR", "127.0.0.1:50051", "address other services use for svc_customer")
    account_addr: str = _setting("BANK_ACCOUNT_ADDR", "127.0.0.1:50052", "address other services use for svc_account")
    transfer_addr: str = _setting("BANK_TRANSFER_ADDR", "127.0.0.1:50053", "address other services use for svc_transfer")
    notify_addr: str = _setting("BANK_NOTIFY_ADDR", "127.0.0.1:50054", "address other services use for svc_notify")

    token_key_dir: str = _setting("BANK_TOKEN_KEY_DIR", "", "folder of token keys: <name>.private.pem, <name>.public.pem "
                                  "(empty: <stack_dir>/keys)")
    token_signing_key: str = _setting("BANK_TOKEN_SIGNING_KEY", "local-1", "name of the first key pair the local stack "
                                      "creates; the key folder's one *.private.pem signs (python -m common.auth rotate)")
    token_generate_local_keys: bool = _setting("BANK_TOKEN_GENERATE_LOCAL_KEYS", True,
                                               "create a key pair and service token when missing (local stack only)")
    service_token: str = _setting("BANK_SERVICE_TOKEN", "", "shared secret for internal RPCs (empty: <key_dir>/service.token)")
    access_token_ttl_s: int = _setting("BANK_ACCESS_TOKEN_TTL_S", 900, "access token lifetime")
    refresh_token_ttl_s: int = _setting("BANK_REFRESH_TOKEN_TTL_S", 30 * 24 * 3600, "refresh token lifetime")
    # Failed attempts counted in Redis over a sliding window (common/ratelimit.py); 0 turns a
    # limit off. Why failures only, and these numbers: docs/decisions/0010.
    login_failures_per_username_max: int = _setting("BANK_LOGIN_FAILURES_PER_USERNAME_MAX", 10,
                                                     "failed logins of one username per window, then 429")
    login_failures_per_username_window_s: int = _setting("BANK_LOGIN_FAILURES_PER_USERNAME_WINDOW_S", 900,
                                                         "window of BANK_LOGIN_FAILURES_PER_USERNAME_MAX")
    login_failures_per_address_max: int = _setting("BANK_LOGIN_FAILURES_PER_ADDRESS_MAX", 100,
                                                   "failed logins from one client address (IPv6: its /64) per window")
    login_failures_per_address_window_s: int = _setting("BANK_LOGIN_FAILURES_PER_ADDRESS_WINDOW_S", 900,
                                                        "window of BANK_LOGIN_FAILURES_PER_ADDRESS_MAX")
    verify_failures_per_address_max: int = _setting("BANK_VERIFY_FAILURES_PER_ADDRESS_MAX", 20,
                                                    "wrong email verification codes from one client address per window "
                                                    "(per customer: 5 ever, in Postgres)")
    verify_failures_per_address_window_s: int = _setting("BANK_VERIFY_FAILURES_PER_ADDRESS_WINDOW_S", 900,
                                                         "window of BANK_VERIFY_FAILURES_PER_ADDRESS_MAX")
    rate_limit_exempt_addresses: str = _setting("BANK_RATE_LIMIT_EXEMPT_ADDRESSES", "127.0.0.1,::1",
                                                "client addresses/CIDRs never limited per address: the gateway's own "
                                                "host (per-username limits still apply)")

    # Set by the launcher (devstack, one value per process), never by hand.
    process_index: int = _setting("BANK_PROCESS_INDEX", 0, "which process of its service this is (0, 1, ...): picks its "
                                  "private gRPC and metrics ports; set by the launcher")
    consumer_static_member: bool = _setting(
        "BANK_CONSUMER_STATIC_MEMBER", False, "join the Kafka consumer groups as a static member named by host and "
        "process index, so a restart takes its own place at once; set by the launcher, which gives every process its "
        "own index (two live processes of one name would take each other's partitions)")
    grpc_shutdown_grace_s: float = _setting("BANK_GRPC_SHUTDOWN_GRACE_S", 5.0, "time in-flight RPCs get to finish on SIGTERM")
    teller_username: str = _setting("BANK_TELLER_USERNAME", "teller", "the local stack's teller login")
    teller_password: str = _setting(
        "BANK_TELLER_PASSWORD", "teller-local-password", "the local stack's teller password (local default only)"
    )

    def local_secrets_in_use(self) -> list[str]:
        """The variables of LOCAL_ONLY_SECRETS still at their local default outside the local
        stack (empty on the local stack, where those defaults are the point)."""
        if self.token_generate_local_keys:
            return []
        by_name = {f.name: f for f in fields(self)}
        return [by_name[name].metadata["env"] for name in LOCAL_ONLY_SECRETS
                if getattr(self, name) == by_name[name].default]

    @property
    def pg_ha(self) -> bool:
        return self.pg_nodes > 1

    def pg_node_port(self, node: int) -> int:
        """PostgreSQL port of HA node `node` (1, 2, ...)."""
        return self.pg_port + node

    def patroni_rest_port(self, node: int) -> int:
        return self.patroni_port + node

    def etcd_client_port(self, member: int) -> int:
        """Client port of etcd member `member` (0, 1, ...); its peer port is the next one."""
        return self.etcd_port + 2 * member

    @property
    def pg_conninfo(self) -> str:
        """One server's address; in HA mode every node's, and libpq tries them in order and keeps
        the one that takes writes (the leader), so a new connection after a failover finds the
        new leader by itself. connect_timeout bounds each try: a node that hangs rather than
        refuses is left for the next."""
        if not self.pg_ha:
            return (
                f"host={self.pg_host} port={self.pg_port} user={self.pg_user} "
                f"password={self.pg_password} dbname={self.pg_database}"
            )
        nodes = range(1, self.pg_nodes + 1)
        hosts = ",".join(self.pg_host for _ in nodes)
        ports = ",".join(str(self.pg_node_port(node)) for node in nodes)
        return (
            f"host={hosts} port={ports} user={self.pg_user} password={self.pg_password} "
            f"dbname={self.pg_database} target_session_attrs=read-write connect_timeout={PG_CONNECT_TIMEOUT_S}"
        )

    @property
    def key_dir(self) -> str:
        return self.token_key_dir or str(Path(self.stack_dir) / "keys")

    def processes(self, service: str) -> int:
        return max(1, int(getattr(self, f"{service}_processes")))

    def private_grpc_port(self, service: str, index: int) -> int:
        return int(getattr(self, f"{service}_grpc_port")) + PROCESS_PORT_STEP * (index + 1)

    def metrics_port(self, service: str, index: int) -> int:
        return int(getattr(self, f"{service}_metrics_port")) + PROCESS_PORT_STEP * index

    def service_log_level(self, service: str) -> str:
        return os.environ.get(f"BANK_{service.upper()}_LOG_LEVEL", self.log_level).upper()


def load(environ: dict[str, str] | None = None) -> Settings:
    """Build Settings from the environment; unknown BANK_* variables are ignored, bad types fail loudly."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(Settings):
        name = f.metadata["env"]
        if name not in env:
            continue
        raw = env[name]
        default: Any = f.default
        kind = type(default)
        try:
            if kind is bool:
                if raw.lower() not in ("1", "true", "yes", "0", "false", "no"):
                    raise ValueError(raw)
                values[f.name] = raw.lower() in ("1", "true", "yes")
            else:
                values[f.name] = kind(raw) if kind is not str else raw
        except ValueError as exc:
            raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from exc
    return Settings(**values)


def documented() -> list[tuple[str, str, str]]:
    """(variable, default, description) for every setting, in declaration order."""
    return [(f.metadata["env"], str(f.default), f.metadata["doc"]) for f in fields(Settings)]

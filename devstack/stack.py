"""Starting and stopping the local stack: in dependency order, concurrently where possible,
with a live progress display, reusing whatever is already running and healthy.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from common.config import REPO_ROOT, Settings
from devstack import proc, tls
from devstack.components import (
    SERVICES,
    Component,
    Paths,
    all_components,
    cluster_members,
    endpoint,
    stop_orphan_postmaster,
)

HEALTH_POLL_S = 0.5


# Patroni shuts its PostgreSQL down on SIGTERM; the nodes' own stop timeout (components.py).
OTHER_MODE_STOP_TIMEOUT_S = 40.0


class StackError(RuntimeError):
    pass


@dataclass
class _State:
    component: Component
    phase: str = "waiting"
    detail: str = ""
    started_at: float = field(default_factory=time.monotonic)
    finished_at: float | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    failed: bool = False
    started_here: bool = False


class Stack:
    def __init__(self, settings: Settings, components: list[Component] | None = None) -> None:
        self.settings = settings
        self.paths = Paths(Path(settings.stack_dir))
        self.components = components if components is not None else all_components(settings)
        self.by_name = {c.name: c for c in self.components}

    def pidfile(self, name: str) -> Path:
        return self.paths.run / f"{name}.pid"

    def running(self, name: str) -> bool:
        return proc.alive(proc.read_pidfile(self.pidfile(name)))

    def expand(self, names: list[str]) -> list[str]:
        """Component names, where a service's name stands for all its processes (svc_x, svc_x-2, ...)."""
        expanded = []
        for name in names:
            matches = [c.name for c in self.components if c.name == name or c.name.startswith(f"{name}-")]
            if not matches:
                raise StackError(f"unknown component: {name}; known: {', '.join(self.by_name)}")
            expanded += matches
        return expanded

    def select(self, names: list[str] | None) -> list[Component]:
        """The named components plus everything they need, in declaration order."""
        if not names:
            return list(self.components)
        wanted: set[str] = set()
        todo = self.expand(names)
        while todo:
            name = todo.pop()
            if name not in wanted:
                wanted.add(name)
                todo.extend(self.by_name[name].after)
        return [c for c in self.components if c.name in wanted]

    # --- up ---------------------------------------------------------------------------------

    async def up(self, names: list[str] | None = None, out: TextIO = sys.stderr) -> list[str]:
        """Start what is not running; return the names this call started. On failure, stop those
        and raise StackError naming the component, with the tail of its log."""
        chosen = self.select(names)
        reserve_service_ports(self.settings)
        states = {c.name: _State(c) for c in chosen}
        display = _Progress(states, out)
        display_task = asyncio.create_task(display.run())
        try:
            await asyncio.gather(*(self._bring_up(states[c.name], states) for c in chosen))
        finally:
            display_task.cancel()
            display.final()
        started = [name for name, st in states.items() if st.started_here]
        failed = [st for st in states.values() if st.failed and st.phase == "failed"]
        if failed:
            report = "\n".join(
                f"\n--- {st.component.name} failed: {st.detail}\n--- last lines of {self.paths.log(st.component.name)}:\n"
                f"{proc.tail(self.paths.log(st.component.name))}"
                + (f"\n--- install log:\n{proc.tail(self.paths.install_log(st.component.name), 20)}"
                   if self.paths.install_log(st.component.name).exists() else "")
                for st in failed
            )
            self.down(started, out=out)
            raise StackError(f"{', '.join(st.component.name for st in failed)} did not become healthy{report}")
        return started

    async def _bring_up(self, st: _State, states: dict[str, _State]) -> None:
        c = st.component
        for dep in c.after:
            if dep in states:
                st.phase, st.detail = "waiting", f"for {dep}"
                await states[dep].ready.wait()
                if states[dep].failed:
                    st.failed, st.phase, st.detail = True, "skipped", f"{dep} failed"
                    st.ready.set()
                    return
        try:
            await self._start_or_reuse(st)
        except Exception as exc:  # any failure of one component is reported with its name and log
            st.failed, st.phase, st.detail = True, "failed", f"{type(exc).__name__}: {exc}"
        finally:
            st.finished_at = time.monotonic()
            st.ready.set()

    async def _start_or_reuse(self, st: _State) -> None:
        c, s = st.component, self.settings
        st.started_at = time.monotonic()
        record = proc.read_pidfile(self.pidfile(c.name))
        if proc.alive(record):
            st.phase, st.detail = "checking", "already running"
            if await self._wait_healthy(st, record, c.start_timeout_s):
                if c.bootstrap is not None:
                    await c.bootstrap(s)
                st.phase, st.detail = "healthy", f"reused pid {record.pid if record else '?'}"
                return
            raise StackError(f"pid {record.pid if record else '?'} is running but not healthy")
        if await c.healthy(s):
            st.phase, st.detail = "healthy", "reused (started outside devstack)"
            return
        st.phase, st.detail = "installing", ""
        argv = await asyncio.to_thread(c.prepare, s, self.paths)
        st.phase, st.detail = "starting", ""
        env = dict(os.environ, PYTHONUNBUFFERED="1", **c.env(s))
        child = proc.spawn(argv, self.paths.log(c.name), env, REPO_ROOT)
        proc.write_pidfile(self.pidfile(c.name), child.pid)
        st.started_here = True
        record = proc.read_pidfile(self.pidfile(c.name))
        st.phase, st.detail = "starting", f"pid {child.pid}"
        if not await self._wait_healthy(st, record, c.start_timeout_s, child=child):
            raise StackError(st.detail or f"not healthy after {c.start_timeout_s:.0f}s")
        if c.bootstrap is not None:
            await c.bootstrap(s)
        st.phase, st.detail = "healthy", f"pid {child.pid}"

    async def _wait_healthy(self, st: _State, record: proc.PidRecord | None, timeout_s: float,
                            child: subprocess.Popen[bytes] | None = None) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if child is not None and child.poll() is not None:
                st.detail = f"exited with code {child.returncode} while starting"
                return False
            if child is None and not proc.alive(record):
                st.detail = "exited while starting"
                return False
            if await st.component.healthy(self.settings):
                return True
            await asyncio.sleep(HEALTH_POLL_S)
        st.detail = f"not healthy after {timeout_s:.0f}s"
        return False

    # --- down and status --------------------------------------------------------------------

    def down(self, names: list[str] | None = None, out: TextIO = sys.stderr) -> list[str]:
        """Stop, in reverse order, the named components (default: all) that devstack started."""
        stopped = []
        if names is not None:
            names = self.expand(names)
        for c in self._stop_order():
            if names is not None and c.name not in names:
                continue
            pidfile = self.pidfile(c.name)
            record = proc.read_pidfile(pidfile)
            if record is None:
                self._stop_orphan_postmaster(c.name, out)
                continue
            if proc.stop(record, c.stop_signal, c.stop_timeout_s):
                stopped.append(c.name)
                print(f"  stopped {c.name} (pid {record.pid})", file=out)
            pidfile.unlink(missing_ok=True)
            self._stop_orphan_postmaster(c.name, out)
        if names is None:
            stopped += self._down_other_mode(out)
        return stopped

    def _down_other_mode(self, out: TextIO) -> list[str]:
        """What this stack folder runs of the other PostgreSQL mode (`BANK_PG_NODES=3 make up`
        then a plain `make down`, or the reverse): pid files of components this mode does not
        declare, all infrastructure (the services are the same in both), stopped after the rest."""
        stopped = []
        # The nodes before etcd, which holds their cluster state while they shut down.
        for pidfile in sorted(self.paths.run.glob("*.pid"), key=lambda f: (f.stem.startswith("etcd"), f.stem)):
            name = pidfile.stem
            if name in self.by_name or not (name == "postgres" or name.startswith(("postgres-", "etcd"))):
                continue
            record = proc.read_pidfile(pidfile)
            if record is not None and proc.stop(record, signal.SIGTERM, OTHER_MODE_STOP_TIMEOUT_S):
                stopped.append(name)
                print(f"  stopped {name} (pid {record.pid}; started in the other PostgreSQL mode)", file=out)
            pidfile.unlink(missing_ok=True)
            self._stop_orphan_postmaster(name, out)
        return stopped

    def _stop_orphan_postmaster(self, name: str, out: TextIO) -> None:
        if name.startswith("postgres-"):
            pid = stop_orphan_postmaster(self.paths, name)
            if pid is not None:
                print(f"  stopped {name}'s PostgreSQL left by its Patroni (pid {pid})", file=out)

    def _stop_order(self) -> list[Component]:
        """Reverse declaration order, except that an HA cluster's leader stops after its
        replicas: stopped first, it would hand its role to a replica that is stopped next."""
        order = list(reversed(self.components))
        if not self.settings.pg_ha:
            return order
        leaders = {str(m.get("name")) for m in cluster_members(self.settings) if m.get("role") == "leader"}
        slots = [i for i, c in enumerate(order) if c.name.startswith("postgres-")]
        for i, c in zip(slots, sorted((order[i] for i in slots), key=lambda c: c.name in leaders), strict=True):
            order[i] = c
        return order

    async def status(self) -> list[tuple[str, str, str]]:
        rows = []
        for c in self.components:
            record = proc.read_pidfile(self.pidfile(c.name))
            if proc.alive(record):
                state = "healthy" if await c.healthy(self.settings) else "unhealthy"
                if c.describe is not None:
                    state = f"{state}: {await c.describe(self.settings)}"
                rows.append((c.name, f"{state} (pid {record.pid if record else '?'})", endpoint(c, self.settings)))
            else:
                rows.append((c.name, "stopped", endpoint(c, self.settings)))
        return rows

    def endpoint_table(self) -> str:
        s = self.settings
        rows = [
            ("REST + gRPC gateway (Envoy)", f"http://127.0.0.1:{s.envoy_port}"),
            ("...over TLS", f"https://localhost:{s.envoy_tls_port}"
                            + ("" if s.tls_cert_file else f"  (CA: {tls.local(s).ca_cert})")),
            ("svc_customer gRPC", f"127.0.0.1:{s.customer_grpc_port}  (metrics :{s.customer_metrics_port})"),
            ("svc_account gRPC", f"127.0.0.1:{s.account_grpc_port}  (metrics :{s.account_metrics_port})"),
            ("svc_transfer gRPC", f"127.0.0.1:{s.transfer_grpc_port}  (metrics :{s.transfer_metrics_port})"),
            ("svc_notify gRPC", f"127.0.0.1:{s.notify_grpc_port}  (metrics :{s.notify_metrics_port})"),
            ("Mailpit UI / API", f"http://127.0.0.1:{s.mailpit_http_port}  (SMTP 127.0.0.1:{s.smtp_port})"),
            ("Prometheus", f"http://127.0.0.1:{s.prometheus_port}"),
            ("Envoy admin", f"http://127.0.0.1:{s.envoy_admin_port}"),
            *([("PostgreSQL (HA: the leader of)", ", ".join(f"127.0.0.1:{s.pg_node_port(i)}" for i in range(1, s.pg_nodes + 1))
                + f"  db={s.pg_database} user={s.pg_user}"),
               ("Patroni REST / etcd", ", ".join(f":{s.patroni_rest_port(i)}" for i in range(1, s.pg_nodes + 1))
                + f" / 127.0.0.1:{s.etcd_port}")] if s.pg_ha else
              [("PostgreSQL", f"127.0.0.1:{s.pg_port}  db={s.pg_database} user={s.pg_user}")]),
            ("Redis / Kafka / Cassandra", f"127.0.0.1:{s.redis_port} / {s.kafka_bootstrap} / 127.0.0.1:{s.cassandra_port}"),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"  {name.ljust(width)}  {where}" for name, where in rows]
        lines.append(f"\n  Teller login: {s.teller_username} / {s.teller_password}")
        lines.append(f"  Logs: {self.paths.logs}/<component>.log   (python -m devstack logs <component>)")
        return "\n".join(lines)


class _Progress:
    """One line per component, redrawn in place on a terminal; one line per change otherwise."""

    SYMBOL = {"healthy": "ok", "failed": "FAILED", "skipped": "skipped"}

    def __init__(self, states: dict[str, _State], out: TextIO) -> None:
        self.states = states
        self.out = out
        self.tty = out.isatty()
        self.drawn = 0
        self.last: dict[str, tuple[str, str]] = {}

    def _line(self, st: _State) -> str:
        end = st.finished_at or time.monotonic()
        elapsed = f"{end - st.started_at:5.1f}s" if st.phase not in ("waiting",) else "      "
        label = self.SYMBOL.get(st.phase, st.phase)
        return f"  {st.component.name:<12} {label:<11} {elapsed}  {st.detail}"

    def draw(self) -> None:
        if self.tty:
            if self.drawn:
                self.out.write(f"\x1b[{self.drawn}F")
            for st in self.states.values():
                self.out.write("\x1b[2K" + self._line(st) + "\n")
            self.drawn = len(self.states)
        else:
            for name, st in self.states.items():
                key = (st.phase, st.detail)
                if self.last.get(name) != key and st.phase != "waiting":
                    self.out.write(self._line(st) + "\n")
                    self.last[name] = key
        self.out.flush()

    async def run(self) -> None:
        # Redraws until Stack.up cancels it, once every component has started or failed.
        while True:
            self.draw()
            await asyncio.sleep(0.2 if self.tty else 0.5)

    def final(self) -> None:
        self.draw()


RESERVED_PORTS = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")
PROCESSES_RESERVED = 4


def reserve_service_ports(settings: Settings) -> None:
    """Keep the services' gRPC ports out of the kernel's ephemeral range (32768-60999 by default,
    which holds 50051 and up): otherwise an outgoing connection of an earlier component (to
    Kafka, Cassandra, ...) can be given, say, 50054 as its local port, and svc_notify then fails
    to bind it (seen: "Address already in use" with nothing listening). Needs root; without it,
    or on another OS, nothing changes. The ports of PROCESSES_RESERVED processes of each service
    are kept whatever runs now, so that scaling one up later (BANK_NOTIFY_PROCESSES=2, say)
    finds its ports free."""
    ports = [port for name in SERVICES for i in range(max(PROCESSES_RESERVED, settings.processes(name)))
             for port in (int(getattr(settings, f"{name}_grpc_port")), settings.private_grpc_port(name, i))]
    wanted = f"{min(ports)}-{max(ports)}"
    try:
        current = RESERVED_PORTS.read_text().strip()
        if wanted not in current.split(","):
            RESERVED_PORTS.write_text(",".join(filter(None, [current, wanted])))
    except OSError:
        pass

"""What the tests of the HA mode share (tests/test_ha.py: the cluster alone; tests/test_failover.py:
the whole bank on it): a stack of their own in the HA mode, each member's role, the leader,
killing the leader as a power loss would (its postmaster, or the whole node), the killed member
back as a replica, and the cleanup of what such a kill leaves running."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import psycopg

from common import config
from devstack import proc
from devstack.components import Component, cluster_members
from devstack.stack import Stack
from tests.support import until

REPLICA_ROLES = ("replica", "sync_standby")
SETTLED_TIMEOUT_S = 90.0  # for the whole cluster, settled, before a kill


@contextlib.contextmanager
def own_ha_stack(prefix: str, ports: Mapping[str, str],
             components: Callable[[config.Settings, dict[str, str]], list[Component]],
             cache: Path | None = None) -> Iterator[tuple[Stack, list[str]]]:
    """A stack in the HA mode (three Patroni nodes on one etcd member) in a stack folder of its
    own and on the ports given (BANK_* variables), so it runs beside the default stack and leaves
    it alone. It runs the components(settings, environment) of its settings, which come from
    that environment; `cache` is a folder of downloads to share (Kafka's jars). Yields the stack
    and the names it started (not the healthy components it found running and reused); stops
    it afterwards, folder and all."""
    # Below /tmp, open to others: the nodes run as the postgres user and must reach their folders.
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        root.chmod(0o755)
        if cache is not None:
            (root / "cache").symlink_to(cache)
        environment = dict(ports, BANK_STACK_DIR=str(root), BANK_PG_NODES="3", BANK_ETCD_MEMBERS="1")
        settings = config.load(dict(os.environ, **environment))
        stack = Stack(settings, components(settings, environment))
        try:
            yield stack, asyncio.run(stack.up(out=sys.stderr))
        finally:
            stack.down(out=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def roles(settings: config.Settings) -> dict[str, str]:
    """Each running member's role: leader, sync_standby or replica."""
    return {str(m["name"]): str(m["role"]) for m in cluster_members(settings)
            if m.get("state") in ("running", "streaming")}


def leader(settings: config.Settings) -> str | None:
    return next((name for name, role in roles(settings).items() if role == "leader"), None)


def leader_with_sync_standby(settings: config.Settings) -> str | None:
    """The leader, once a synchronous standby confirms its commits (strict mode: no commit before)."""
    return leader(settings) if "sync_standby" in roles(settings).values() else None


def whole_cluster(settings: config.Settings) -> str | None:
    """The leader, once the cluster is whole and settled: every node running, one leader, a
    synchronous standby, every replica on the leader's timeline with a known lag, the same twice
    SETTLE_S apart. A node that came back from a kill may show as a running replica for a moment,
    then stop again for its pg_rewind; a kill in that moment leaves strict mode no standby it may
    promote (the one it would promote is down), and no failover until it is back."""
    first = _whole(settings)
    if first is None:
        return None
    time.sleep(SETTLE_S)
    return first[0] if _whole(settings) == first else None


SETTLE_S = 2.0


def _whole(settings: config.Settings) -> tuple[str, tuple[tuple[str, str, object], ...]] | None:
    members = cluster_members(settings)
    if len(members) != settings.pg_nodes or any(m.get("state") not in ("running", "streaming") for m in members):
        return None
    leaders = [m for m in members if m.get("role") == "leader"]
    standbys = [m for m in members if m.get("role") != "leader"]
    if len(leaders) != 1 or not any(m.get("role") == "sync_standby" for m in standbys):
        return None
    timeline = leaders[0].get("timeline")
    if any(m.get("timeline", timeline) != timeline or not isinstance(m.get("lag"), int) for m in standbys):
        return None
    return str(leaders[0]["name"]), tuple(sorted((str(m["name"]), str(m["role"]), m.get("timeline")) for m in members))


def node_port(settings: config.Settings, name: str) -> int:
    """PostgreSQL port of the member named postgres-<i>."""
    return settings.pg_node_port(int(name.rsplit("-", 1)[1]))


def data_directory(settings: config.Settings, name: str) -> Path:
    """The data folder of member `name`, asked of that very node."""
    with psycopg.connect(host=settings.pg_host, port=node_port(settings, name), user=settings.pg_user,
                         password=settings.pg_password, dbname=settings.pg_database, connect_timeout=5,
                         autocommit=True) as conn:
        row = conn.execute("SHOW data_directory").fetchone()
    assert row is not None
    return Path(str(row[0]))


def postmaster_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


def kill_node(stack: Stack, name: str, data_dir: Path, kill: str) -> None:
    """kill -9 of member `name`'s postmaster ("postmaster"), or of the whole node ("node"): Patroni
    first, so nobody renews the leader key, which expires (ttl 10 s), then its postmaster."""
    assert kill in ("postmaster", "node"), kill
    postmaster = postmaster_pid(data_dir)
    assert postmaster is not None, f"no postmaster.pid in {data_dir}"
    if kill == "node":
        record = proc.read_pidfile(stack.pidfile(name))
        assert record is not None, f"{name} has no pid file"
        os.killpg(record.pid, signal.SIGKILL)
    os.kill(postmaster, signal.SIGKILL)


async def kill_the_leader(stack: Stack, kill: str) -> tuple[str, float]:
    """kill_node of the leader once the cluster is whole and settled: the member killed, and when
    (time.monotonic())."""
    old = await asyncio.to_thread(until, lambda: whole_cluster(stack.settings), "the whole cluster, settled",
                                  SETTLED_TIMEOUT_S, 0.5)
    data_dir = await asyncio.to_thread(data_directory, stack.settings, old)
    killed_at = time.monotonic()
    kill_node(stack, old, data_dir, kill)
    return old, killed_at


async def back_as_replica(stack: Stack, name: str, kill: str, timeout_s: float) -> str:
    """The role of the killed member once it is back as a replica. A killed node is started
    again first, by its launcher, as `make up` (or a supervisor) would; a killed postmaster is
    started again by its Patroni."""
    if kill == "node":
        await stack.up([name], out=sys.stderr)
    return await asyncio.to_thread(
        until, lambda: role if (role := roles(stack.settings).get(name)) in REPLICA_ROLES else None,
        f"{name} back as a replica", timeout_s, 0.5)

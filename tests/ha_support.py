"""What the tests of the HA mode share (tests/test_ha.py: the cluster alone; tests/test_failover.py:
the whole bank on it): each member's role, the leader, killing the leader as a power loss would
(its postmaster, or the whole node), and the cleanup of what such a kill leaves running."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psycopg

from common import config
from devstack import proc
from devstack.components import cluster_members
from devstack.stack import Stack

REPLICA_ROLES = ("replica", "sync_standby")


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

"""The HA mode's PostgreSQL (BANK_PG_NODES=3, issue #19): three Patroni nodes on etcd, replicated
synchronously, failing over by themselves, reached through the services' own pool (common/db.py)
with the multi-host conninfo.

The test starts its own cluster, with the launcher's own components (devstack.components
.ha_components), in a stack folder and on ports of its own (etcd 12379, nodes 15433-15435, Patroni
18009-18011), so it runs beside the default stack, whatever that is, and leaves it alone. Under a
write load through a service's pool it kills the leader, (a) its postmaster alone, (b) the whole
node (Patroni and its postmaster), and checks what a client of the bank would notice: every
acknowledged commit is on the new leader, a failed write failed with an error the services answer
503 for (common/db.TRANSIENT_ERRORS, never a 500), writes succeed again within 30 s of the kill,
and the old leader comes back as a replica. Margins are wide: these machines are noisy.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from common import db
from common.config import REPO_ROOT
from devstack.components import ha_components
from devstack.stack import Stack
from svc_transfer import store
from tests import figures
from tests.ha_support import (
    back_as_replica,
    kill_the_leader,
    leader,
    leader_with_sync_standby,
    node_port,
    own_ha_stack,
    roles,
    whole_cluster,
)
from tests.support import until

FAILOVER_WINDOW_MAX_S = 30.0
REJOIN_TIMEOUT_S = 90.0
WRITERS = 4
PORTS = {"BANK_PG_PORT": "15432", "BANK_PATRONI_PORT": "18008", "BANK_ETCD_PORT": "12379"}
SCHEMA = "ha_probe"
# A write failing with one of these has an unknown outcome (the services answer 503 for each).
WRITE_ERRORS: tuple[type[Exception], ...] = (*db.TRANSIENT_ERRORS, TimeoutError)


@pytest.fixture(scope="module")
def ha_stack() -> Iterator[Stack]:
    with own_ha_stack("bank-ha-test-", PORTS, lambda settings, _: ha_components(settings)) as (stack, _):
        yield stack


@dataclass
class Load:
    """Writers through one service pool: each commit that returned is acknowledged; each that
    raised is unknown until checked, and raised an error of the kind the services answer 503 for,
    or it is recorded as unexpected (a 500 in a service)."""
    # (row, when the commit returned, the port of the node that acknowledged it)
    acknowledged: list[tuple[int, float, int]] = field(default_factory=list)
    unknown: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    unexpected: list[BaseException] = field(default_factory=list)
    next_id: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def writer(self, pool: AsyncConnectionPool) -> None:
        # Runs until stop is set (the test sets it after the last check, within minutes).
        while not self.stop.is_set():
            self.next_id += 1
            row = self.next_id
            try:
                # As the ledger bounds its calls (store.CALL_DEADLINE_S): a commit waiting for a
                # standby is not bounded by statement_timeout.
                async with asyncio.timeout(store.CALL_DEADLINE_S), pool.connection() as conn:
                    await conn.execute("INSERT INTO acked (id) VALUES (%s)", (row,))
                    port = int(conn.info.port)
                self.acknowledged.append((row, time.monotonic(), port))
            except WRITE_ERRORS as exc:
                self.unknown.append(row)
                self.errors[type(exc).__name__] += 1
                await asyncio.sleep(0.05)
            except Exception as exc:  # anything else would be a 500 in a service
                self.unexpected.append(exc)
                await asyncio.sleep(0.05)

    def first_ack_after(self, t: float, elsewhere_than: int = 0) -> float | None:
        """When the first commit after t returned (from a node other than elsewhere_than's port)."""
        return next((at for _, at, port in self.acknowledged if at > t and port != elsewhere_than), None)


@pytest.fixture
async def load(ha_stack: Stack) -> AsyncIterator[tuple[Load, AsyncConnectionPool]]:
    pool = await db.open_pool(ha_stack.settings, SCHEMA)
    async with pool.connection() as conn:
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        await conn.execute("CREATE TABLE IF NOT EXISTS acked (id bigint PRIMARY KEY, at timestamptz DEFAULT now())")
        await conn.execute("TRUNCATE acked")
    state = Load()
    writers = [asyncio.create_task(state.writer(pool)) for _ in range(WRITERS)]
    try:
        yield state, pool
    finally:
        state.stop.set()
        await asyncio.wait_for(asyncio.gather(*writers), 2 * store.CALL_DEADLINE_S)
        await pool.close()


def test_a_leader_with_a_synchronous_standby(ha_stack: Stack) -> None:
    members = until(lambda: r if sorted((r := roles(ha_stack.settings)).values()) == ["leader", "replica", "sync_standby"]
                    else None, "a leader, a sync standby and a replica", timeout_s=60)
    first = next(name for name, role in members.items() if role == "leader")
    with psycopg.connect(ha_stack.settings.pg_conninfo, autocommit=True) as conn:
        port, in_recovery = conn.execute("SELECT inet_server_port(), pg_is_in_recovery()").fetchone()  # type: ignore[misc]
        standby_names = conn.execute("SHOW synchronous_standby_names").fetchone()
    # The multi-host conninfo lands on the leader, whichever node that is.
    assert (port, in_recovery) == (node_port(ha_stack.settings, first), False)
    sync = next(name for name, role in members.items() if role == "sync_standby")
    assert standby_names is not None and sync in standby_names[0]


async def _failover(ha_stack: Stack, load: Load, pool: AsyncConnectionPool, kill: str) -> None:
    settings = ha_stack.settings
    await asyncio.to_thread(until, lambda: leader_with_sync_standby(settings), "a leader with a sync standby", 60)
    await asyncio.to_thread(until, lambda: True if len(load.acknowledged) >= 200 else None, "writes before the kill", 60)
    old, killed_at = await kill_the_leader(ha_stack, kill)
    acknowledged_before = len(load.acknowledged)

    # Backends of a killed postmaster may finish what they were doing: writes "again" means
    # acknowledged by another node.
    old_port = node_port(settings, old)
    resumed_at = await asyncio.to_thread(until, lambda: load.first_ack_after(killed_at, old_port),
                                         "a write acknowledged by another node after the kill", FAILOVER_WINDOW_MAX_S + 30)
    new = leader(settings)
    rejoined = await back_as_replica(ha_stack, old, kill, REJOIN_TIMEOUT_S)
    await asyncio.to_thread(until, lambda: True if load.first_ack_after(time.monotonic() - 1) else None, "writes go on", 30)
    load.stop.set()
    await asyncio.sleep(0.5)

    acked = {row for row, _, _ in load.acknowledged}
    async with pool.connection() as conn:
        present = {row for (row,) in await (await conn.execute("SELECT id FROM acked")).fetchall()}
        # A write that raised has an unknown outcome: retrying it (as a client retries with its
        # request_id) leaves it there exactly once.
        for row in load.unknown:
            await conn.execute("INSERT INTO acked (id) VALUES (%s) ON CONFLICT (id) DO NOTHING", (row,))
    window_s = resumed_at - killed_at
    figures.report(f"HA storage: kill -9 of the leader's {kill} ({old}): writes again after {window_s:.1f}s on {new}; "
                   f"{old} rejoined as {rejoined}; acknowledged {len(acked)} ({acknowledged_before} before the kill), "
                   f"failed {len(load.unknown)} by type {dict(load.errors)}, "
                   f"committed anyway {len(set(load.unknown) & present)}")
    assert not load.unexpected, f"errors a service would answer 500 for: {load.unexpected[:3]}"
    assert acked - present == set(), f"acknowledged and lost: {sorted(acked - present)[:20]}"
    assert window_s < FAILOVER_WINDOW_MAX_S
    assert new is not None and new != old


async def test_kill_9_of_the_leaders_postmaster_fails_over_and_loses_nothing(
        ha_stack: Stack, load: tuple[Load, AsyncConnectionPool]) -> None:
    await _failover(ha_stack, *load, kill="postmaster")


async def test_kill_9_of_the_whole_leader_node_fails_over_and_loses_nothing(
        ha_stack: Stack, load: tuple[Load, AsyncConnectionPool]) -> None:
    await _failover(ha_stack, *load, kill="node")


async def test_a_commit_no_standby_confirms_is_busy_not_refused_and_its_retry_moves_money_once(
        ha_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """With synchronous_mode_strict and no standby left, a commit waits for one forever, and the
    cancel that ends the wait leaves it committed locally. The ledger answers LedgerBusy (503
    LEDGER_BUSY: outcome unknown, retry with the request_id) past its call deadline, never a
    refusal; once a standby is back, the retry finds the movement and moves nothing again."""
    settings = ha_stack.settings
    await asyncio.to_thread(until, lambda: whole_cluster(settings), "the whole cluster, settled", 90, 0.5)
    pool = await db.open_pool(settings, "transfer")
    try:
        await db.migrate(pool, "transfer", REPO_ROOT / "svc_transfer" / "migrations")
        account = str(uuid.uuid4())
        assert (await store.LedgerStore(pool).open_ledger_account(account, str(uuid.uuid4()), "USD")).error is None
        deposit = store.MovementRequest(initiator="teller:ha-test", request_id=uuid.uuid4().hex, kind="DEPOSIT",
                                        owner_id=None, from_account_id=None, to_account_id=account, amount=500,
                                        currency="USD", description="", event_headers={})
        standbys = [name for name, role in roles(settings).items() if role != "leader"]
        ha_stack.down(standbys, out=sys.stderr)
        try:
            monkeypatch.setattr(store, "CALL_DEADLINE_S", 3.0)  # the bound, shortened for the test
            with pytest.raises(store.LedgerBusy):
                await store.move_money_batch(pool, [deposit])
        finally:
            await ha_stack.up(standbys, out=sys.stderr)
        await asyncio.to_thread(until, lambda: True if "sync_standby" in roles(settings).values() else None,
                                "a sync standby back", REJOIN_TIMEOUT_S, 0.5)
        monkeypatch.undo()
        retried: store.Movement | None = None
        for _ in range(20):  # the pool replaces what the cancel left behind
            try:
                [retried] = await store.move_money_batch(pool, [deposit])
                break
            except store.LedgerBusy:
                await asyncio.sleep(0.5)
        assert retried is not None and retried.error is None and retried.transfer is not None
        accounts = await store.LedgerStore(pool).customer_accounts([account])
        async with pool.connection() as conn:
            [(count,)] = await (await conn.execute(
                "SELECT count(*) FROM transfers WHERE request_id = %s", (deposit.request_id,))).fetchall()
        figures.report(f"HA storage, no standby: LedgerBusy after the deadline; the retry replayed={retried.replayed}")
        assert count == 1 and accounts[account].balance == 500
    finally:
        await pool.close()

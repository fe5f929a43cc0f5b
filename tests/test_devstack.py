"""The launcher's own rules, without starting anything: stop only what it started, order by
dependency, reject bad settings."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from common import config
from devstack import proc
from devstack.components import SERVICES
from devstack.stack import PROCESSES_RESERVED, RESERVED_PORTS, Stack, StackError


def test_stop_never_signals_a_recycled_pid(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        pidfile = tmp_path / "x.pid"
        proc.write_pidfile(pidfile, sleeper.pid)
        record = proc.read_pidfile(pidfile)
        assert record is not None and proc.alive(record)
        # Same pid, different start time: what a recycled pid looks like.
        stale = proc.PidRecord(record.pid, record.start_ticks - 1)
        assert not proc.alive(stale)
        assert proc.stop(stale, signal.SIGTERM, 1.0) is False
        assert sleeper.poll() is None
        assert proc.stop(record, signal.SIGTERM, 5.0) is True
        assert not proc.alive(record)
    finally:
        if sleeper.poll() is None:
            sleeper.kill()


def test_stop_escalates_to_sigkill_when_ignored(tmp_path: Path) -> None:
    stubborn = subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 30"], start_new_session=True)
    try:
        proc.write_pidfile(tmp_path / "s.pid", stubborn.pid)
        record = proc.read_pidfile(tmp_path / "s.pid")
        assert record is not None
        started = time.monotonic()
        assert proc.stop(record, signal.SIGTERM, 0.5) is True
        assert not proc.alive(record)
        assert time.monotonic() - started < 5
    finally:
        if stubborn.poll() is None:
            stubborn.kill()


def test_selecting_a_service_brings_its_dependencies() -> None:
    stack = Stack(config.load({}))
    names = [c.name for c in stack.select(["svc_notify"])]
    assert names == ["postgres", "redis", "kafka", "cassandra", "mailpit", "svc_notify"]
    with pytest.raises(StackError):
        stack.select(["no_such_component"])


def test_bad_setting_names_the_variable() -> None:
    with pytest.raises(ValueError, match="BANK_PG_PORT"):
        config.load({"BANK_PG_PORT": "not-a-port"})
    assert config.load({"BANK_PG_PORT": "6543"}).pg_port == 6543


def test_a_killed_child_that_is_not_reaped_yet_counts_as_dead(tmp_path: Path) -> None:
    """The launcher's own child, killed: until reaped it is a zombie with the same start time."""
    child = subprocess.Popen(["sleep", "30"], start_new_session=True)
    proc.write_pidfile(tmp_path / "c.pid", child.pid)
    record = proc.read_pidfile(tmp_path / "c.pid")
    assert record is not None and proc.alive(record)
    child.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child.pid}/stat").read_text().split(") ", 1)[1][0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.05)  # wait until the kernel made it a zombie (not reaped: we never wait())
    assert not proc.alive(record)


def test_service_ports_are_kept_out_of_the_ephemeral_range(stack: Stack, settings: config.Settings) -> None:
    """No outgoing connection can be handed a service's port before the service binds it."""
    if not os.access(RESERVED_PORTS, os.W_OK):
        pytest.skip(f"{RESERVED_PORTS} is not writable here (not root, or not Linux)")
    reserved: list[tuple[int, int]] = []
    for part in filter(None, RESERVED_PORTS.read_text().strip().split(",")):
        low, _, high = part.partition("-")
        reserved.append((int(low), int(high or low)))
    for name in SERVICES:
        # Those of the processes that run, and of more of them (a service scaled up later).
        for i in range(max(PROCESSES_RESERVED, settings.processes(name))):
            for port in (int(getattr(settings, f"{name}_grpc_port")), settings.private_grpc_port(name, i)):
                assert any(low <= port <= high for low, high in reserved), f"{name} port {port} is not reserved"

"""Processes the launcher starts: pid files, liveness, and stopping exactly what was started.

A pid file holds the pid and the process's start time (from /proc), so a recycled pid that now
belongs to someone else is never signalled.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PidRecord:
    pid: int
    start_ticks: int


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process, from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The fields after the command name (which may itself contain spaces and parentheses):
    # state is field 3, starttime field 22.
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], int(fields[19])


def _start_ticks(pid: int) -> int | None:
    stat = _stat(pid)
    return stat[1] if stat else None


def write_pidfile(path: Path, pid: int) -> None:
    ticks = _start_ticks(pid)
    if ticks is None:
        raise RuntimeError(f"process {pid} exited before its pid file could be written")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{pid} {ticks}\n")


def read_pidfile(path: Path) -> PidRecord | None:
    try:
        pid, ticks = path.read_text().split()
        return PidRecord(int(pid), int(ticks))
    except (OSError, ValueError):
        return None


def alive(record: PidRecord | None) -> bool:
    """The recorded process still runs. A zombie does not: it died, and its parent (a
    long-lived launcher, such as the test session that started the stack) has not reaped it
    yet; reap it if it is ours."""
    if record is None:
        return False
    stat = _stat(record.pid)
    if stat is None or stat[1] != record.start_ticks:
        return False
    if stat[0] == "Z":
        _reap(record.pid)
        return False
    return True


def spawn(argv: list[str], log_path: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    """Start a process in its own session (so its whole group can be stopped), output to its log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n===== devstack start {time.strftime('%Y-%m-%dT%H:%M:%S')} =====\n".encode())
        log.flush()
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )


def stop(record: PidRecord, stop_signal: int, timeout_s: float) -> bool:
    """Signal the process group, wait up to timeout_s, then SIGKILL it. True when it was running."""
    if not alive(record):
        return False
    try:
        os.killpg(record.pid, stop_signal)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive(record):
            return True
        _reap(record.pid)
        time.sleep(0.1)
    try:
        os.killpg(record.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    kill_deadline = time.monotonic() + 5.0
    while alive(record) and time.monotonic() < kill_deadline:
        _reap(record.pid)
        time.sleep(0.1)
    return True


def _reap(pid: int) -> None:
    # Our own children become zombies until waited for; a zombie still has its /proc entry.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(data.splitlines()[-lines:])

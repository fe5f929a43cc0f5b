"""The one stack fixture (and on it the ledger clients `bank` and `banks`, and `pool` on
svc_transfer's schema): the session starts the local stack through the launcher's own code
(`devstack.stack.Stack.up`), reusing whatever already runs and is healthy (a developer's
`make up`), and stops at the end exactly what it started.

And the end-of-session check that no log of the stack holds a secret the tests used
(tests/secret_scan.py): it fails the run if one does."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from psycopg_pool import AsyncConnectionPool

from common import config, db
from devstack.components import Paths
from devstack.stack import Stack
from tests import figures, secret_scan
from tests.ledger_support import Bank
from tests.tokens import TestTokens, test_tokens

_log_sizes: dict[Path, int] = {}


@pytest.fixture(scope="session")
def settings() -> config.Settings:
    return config.load()


@pytest.fixture(scope="session")
def stack(settings: config.Settings) -> Iterator[Stack]:
    s = Stack(settings)
    started = asyncio.run(s.up(out=sys.stderr))
    try:
        yield s
    finally:
        s.down(started)


@pytest.fixture(scope="module")
def tokens(stack: Stack, settings: config.Settings) -> TestTokens:
    """Real tokens minted with the stack's keys (tests/tokens.py)."""
    return test_tokens(settings)


@pytest.fixture(scope="module")
async def bank(stack: Stack, settings: config.Settings) -> AsyncIterator[Bank]:
    """The ledger's client (tests/ledger_support.py) on svc_transfer's shared port."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.transfer_grpc_port}") as channel:
        yield Bank(settings, channel)


# Connections of `banks`: svc_transfer's processes share the port, and the kernel spreads
# connections over them, so requests on several connections reach both.
CHANNELS = 4


@pytest.fixture(scope="module")
async def banks(stack: Stack, settings: config.Settings) -> AsyncIterator[list[Bank]]:
    """CHANNELS ledger clients, each on a connection of its own to svc_transfer's shared port."""
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{settings.transfer_grpc_port}") for _ in range(CHANNELS)]
    try:
        yield [Bank(settings, channel) for channel in channels]
    finally:
        for channel in channels:
            await channel.close()


@pytest.fixture
async def pool(stack: Stack, settings: config.Settings) -> AsyncIterator[AsyncConnectionPool]:
    """A pool on svc_transfer's schema, for the tests that call its store directly."""
    pool = await db.open_pool(settings, "transfer")
    try:
        yield pool
    finally:
        await pool.close()


def _logs() -> Path:
    return Paths(Path(config.load().stack_dir)).logs


def pytest_sessionstart(session: pytest.Session) -> None:
    settings = config.load()
    _log_sizes.update(secret_scan.log_sizes(_logs()) if _logs().is_dir() else {})
    secret_scan.REGISTRY.remember(settings.teller_password)
    token_file = Path(settings.key_dir) / "service.token"
    secret_scan.REGISTRY.remember(settings.service_token or (token_file.read_text().strip() if token_file.is_file() else ""))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fails the run if a log written during it holds a secret the tests used, or anything
    shaped like a token or a private key."""
    if not _logs().is_dir():
        return
    findings = secret_scan.scan(_logs(), _log_sizes, secret_scan.REGISTRY)
    if findings:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        text = secret_scan.report(findings)
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(text, red=True)
        else:
            print(text, file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    """The figures tests measured (tests/figures.py), together at the end of the run."""
    if figures.LINES:
        terminalreporter.section("figures the tests measured")
        for line in figures.LINES:
            terminalreporter.write_line(line)

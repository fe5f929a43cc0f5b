"""The one stack fixture: the session starts the local stack through the launcher's own code
(`devstack.stack.Stack.up`), reusing whatever already runs and is healthy (a developer's
`make up`), and stops at the end exactly what it started."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator

import pytest

from common import config
from devstack.stack import Stack


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

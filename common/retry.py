"""Bounded retries with exponential backoff, for transient failures of one operation."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from common.logging import fields

log = logging.getLogger("retry")

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    tries: int = 5
    initial_s: float = 0.2
    max_s: float = 5.0

    def __post_init__(self) -> None:
        assert self.tries >= 1 and 0 < self.initial_s <= self.max_s

    def delay_s(self, failed_tries: int) -> float:
        """The pause after the n-th failed try: doubling from initial_s, capped at max_s, with
        jitter so that many workers failing together do not retry together."""
        ceiling = min(self.max_s, self.initial_s * 2.0 ** (failed_tries - 1))
        return ceiling * random.uniform(0.5, 1.0)  # noqa: S311  # jitter, not a secret

    def worst_case_s(self, attempt_timeout_s: float) -> float:
        """Longest time retry() can take when every try runs into attempt_timeout_s."""
        pauses = sum(min(self.max_s, self.initial_s * 2.0 ** (n - 1)) for n in range(1, self.tries))
        return self.tries * attempt_timeout_s + pauses


async def retry(
    operation: Callable[[], Awaitable[T]],
    *,
    what: str,
    transient: tuple[type[BaseException], ...],
    backoff: Backoff,
) -> T:
    """Run operation until it succeeds or has failed backoff.tries times with a transient error;
    then the last error propagates. Any other error propagates at once."""
    for failed in range(1, backoff.tries + 1):
        try:
            return await operation()
        except transient as exc:
            if failed == backoff.tries:
                log.warning("%s failed; giving up", what,
                            extra=fields(tries=failed, error=f"{type(exc).__name__}: {exc}"))
                raise
            delay = backoff.delay_s(failed)
            log.info("%s failed; retrying", what,
                     extra=fields(tries=failed, retry_in_s=round(delay, 3), error=f"{type(exc).__name__}: {exc}"))
            await asyncio.sleep(delay)
    raise AssertionError("unreachable: the loop returns or raises")

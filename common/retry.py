"""Bounded retries with exponential backoff, for transient failures of one operation; the one
place that computes a pause between tries (retry() and the supervisor loops that restart a
worker until it is stopped both take theirs from a Backoff)."""

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

# 2 ** 62 times any initial pause is past every cap: the exponent stops growing there, so a
# worker failing for days (a supervisor loop counts its failures without bound) cannot overflow.
EXPONENT_MAX = 62


@dataclass(frozen=True)
class Backoff:
    tries: int = 5
    initial_s: float = 0.2
    max_s: float = 5.0

    def __post_init__(self) -> None:
        assert self.tries >= 1 and 0 < self.initial_s <= self.max_s

    def ceiling_s(self, failed_tries: int) -> float:
        """The longest pause after the n-th failed try: doubling from initial_s, capped at max_s."""
        assert failed_tries >= 1
        return min(self.max_s, self.initial_s * 2.0 ** min(failed_tries - 1, EXPONENT_MAX))

    def delay_s(self, failed_tries: int) -> float:
        """The pause after the n-th failed try, with jitter so that many workers failing
        together do not retry together."""
        return self.ceiling_s(failed_tries) * random.uniform(0.5, 1.0)  # noqa: S311  # jitter, not a secret

    def worst_case_s(self, attempt_timeout_s: float) -> float:
        """Longest time retry() can take when every try runs into attempt_timeout_s."""
        return self.tries * attempt_timeout_s + sum(self.ceiling_s(n) for n in range(1, self.tries))


async def retry(
    operation: Callable[[], Awaitable[T]],
    *,
    what: str,
    transient: tuple[type[BaseException], ...],
    backoff: Backoff,
    permanent: tuple[type[BaseException], ...] = (),
    give_up_after_s: float | None = None,
) -> T:
    """Run operation until it succeeds or has failed backoff.tries times with a transient error
    (or, with give_up_after_s, until that long has passed since the first try); then the last
    error propagates. Any other error, and a transient one that is also permanent, propagates
    at once."""
    deadline = None if give_up_after_s is None else asyncio.get_running_loop().time() + give_up_after_s
    for failed in range(1, backoff.tries + 1):
        try:
            return await operation()
        except permanent:
            raise
        except transient as exc:
            error = f"{type(exc).__name__}: {exc}"
            if failed == backoff.tries or (deadline is not None and asyncio.get_running_loop().time() >= deadline):
                log.warning("%s failed; giving up", what, extra=fields(tries=failed, error=error))
                raise
            delay = backoff.delay_s(failed)
            log.info("%s failed; retrying", what, extra=fields(tries=failed, retry_in_s=round(delay, 3), error=error))
            await asyncio.sleep(delay)
    raise AssertionError("unreachable: the loop returns or raises")


# A dependency (Postgres, Cassandra) that is still starting when a service starts: tried with
# short pauses at first, then every 2 s or so, for DEPENDENCY_WAIT_S in all (tries bound it too).
DEPENDENCY_WAIT_S = 60.0
DEPENDENCY_BACKOFF = Backoff(tries=1000, initial_s=0.2, max_s=2.0)

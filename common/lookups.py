"""Lookups by key, coalesced: the ones asked for in one turn of the event loop (handlers working
side by side, e.g. the events of one consumer batch) are answered by one query per chunk of keys
instead of one query per caller. A round trip, a pooled connection and the driver's and the
server's per-request work are paid once for many callers.

A failed query fails the callers whose keys it held (each retries on its own, and the retries of
one turn are coalesced again); the others get their answer. A caller cancelled meanwhile is
simply not answered."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LookupInterrupted(Exception):
    """A lookup's query was cancelled, not failed (the service is stopping)."""


class LookupCoalescer(Generic[K, V]):
    """fetch(keys) returns the value of each key found (absent keys are simply missing); it is
    called with at most chunk_max keys, the chunks of one turn side by side."""

    def __init__(self, fetch: Callable[[list[K]], Awaitable[dict[K, V]]], chunk_max: int) -> None:
        if chunk_max < 1:
            raise ValueError("chunk_max must be at least 1")
        self._fetch = fetch
        self._chunk_max = chunk_max
        self._queued: list[tuple[Sequence[K], asyncio.Future[dict[K, V]]]] = []
        self._running: set[asyncio.Task[None]] = set()  # strong references until done

    async def get(self, keys: Sequence[K]) -> dict[K, V]:
        """The value of each of keys that was found."""
        if not keys:
            return {}
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[dict[K, V]] = loop.create_future()
        self._queued.append((keys, answer))
        if len(self._queued) == 1:
            loop.call_soon(self._flush)
        found = await answer
        return {key: found[key] for key in keys if key in found}

    def _flush(self) -> None:
        queued, self._queued = self._queued, []
        task = asyncio.get_running_loop().create_task(self._answer(queued))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _answer(self, queued: list[tuple[Sequence[K], asyncio.Future[dict[K, V]]]]) -> None:
        wanted = list(dict.fromkeys(key for keys, _ in queued for key in keys))
        chunks = [wanted[i:i + self._chunk_max] for i in range(0, len(wanted), self._chunk_max)]
        try:
            results = await asyncio.gather(*(self._fetch(chunk) for chunk in chunks), return_exceptions=True)
        except BaseException as exc:  # this task itself cancelled (shutdown): nobody is left waiting
            for _, answer in queued:
                if not answer.done():
                    answer.set_exception(LookupInterrupted(f"lookup interrupted: {type(exc).__name__}"))
            raise
        found: dict[K, V] = {}
        failed: dict[K, Exception] = {}  # the keys of a failed chunk, with its error
        for chunk, result in zip(chunks, results, strict=True):
            if isinstance(result, BaseException):
                failure = result if isinstance(result, Exception) else LookupInterrupted(
                    f"lookup interrupted: {type(result).__name__}")
                failed.update(dict.fromkeys(chunk, failure))
            else:
                found.update(result)
        for keys, answer in queued:
            if answer.done():  # its caller was cancelled
                continue
            # A caller fails only when one of its own keys was in a failed chunk; its retry decides.
            error = next((failed[key] for key in keys if key in failed), None)
            if error is not None:
                answer.set_exception(error)
            else:
                answer.set_result(found)

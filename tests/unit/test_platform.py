"""common/: the retry helper's bounds, the one currency list against the ledger's cash
accounts, page tokens, coalesced lookups."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import grpc
import pytest

from common import errors, pagination, server
from common.currencies import SUPPORTED_CURRENCIES
from common.errors import DomainError
from common.lookups import LookupCoalescer
from common.retry import Backoff, retry

REPO = Path(__file__).resolve().parents[2]


class Flaky(Exception):
    pass


def failing(times: int, error: Exception) -> tuple[list[int], object]:
    calls: list[int] = []

    async def operation() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise error
        return "done"

    return calls, operation


async def test_retry_gives_up_after_its_tries_with_the_last_error() -> None:
    calls, operation = failing(5, Flaky("down"))
    with pytest.raises(Flaky):
        await retry(operation, what="op", transient=(Flaky,), backoff=Backoff(tries=3, initial_s=0.001, max_s=0.001))  # type: ignore[arg-type]
    assert len(calls) == 3
    calls, operation = failing(2, Flaky("down"))
    assert await retry(operation, what="op", transient=(Flaky,),  # type: ignore[arg-type]
                       backoff=Backoff(tries=3, initial_s=0.001, max_s=0.001)) == "done"


async def test_retry_passes_other_and_permanent_errors_at_once() -> None:
    for error, permanent in ((ValueError("bug"), ()), (Flaky("final"), (Flaky,))):
        calls, operation = failing(5, error)
        with pytest.raises(type(error)):
            await retry(operation, what="op", transient=(Flaky,), permanent=permanent,  # type: ignore[arg-type]
                        backoff=Backoff(tries=3, initial_s=0.001, max_s=0.001))
        assert len(calls) == 1


async def test_retry_with_a_deadline_stops_at_it() -> None:
    calls, operation = failing(1000, Flaky("down"))
    with pytest.raises(Flaky):
        await retry(operation, what="op", transient=(Flaky,), backoff=Backoff(tries=1000, initial_s=0.01, max_s=0.01),  # type: ignore[arg-type]
                    give_up_after_s=0.05)
    assert 1 < len(calls) < 1000


def test_backoff_doubles_to_its_cap_and_never_overflows() -> None:
    backoff = Backoff(tries=1, initial_s=0.5, max_s=30.0)
    assert [backoff.ceiling_s(n) for n in (1, 2, 3, 7, 10_000)] == [0.5, 1.0, 2.0, 30.0, 30.0]
    assert all(0.25 <= backoff.delay_s(1) <= 0.5 for _ in range(100))
    assert Backoff(tries=3, initial_s=1.0, max_s=5.0).worst_case_s(2.0) == 3 * 2.0 + 1.0 + 2.0


def test_the_ledger_has_a_cash_account_for_each_supported_currency_and_no_other() -> None:
    sql = (REPO / "svc_transfer/migrations/0001_ledger.sql").read_text()
    [listed] = re.findall(r"unnest\(ARRAY\[([^\]]*)\]\)", sql)
    assert {code.strip().strip("'") for code in listed.split(",")} == SUPPORTED_CURRENCIES


def test_page_tokens_round_trip_and_refuse_anything_else() -> None:
    token = pagination.encode_token(["a", 1])
    assert pagination.decode_token(token, 2) == ["a", 1]
    assert pagination.decode_token("", 2) is None
    for bad in (token + "!", pagination.encode_token(["a"]), "x" * (pagination.TOKEN_LENGTH_MAX + 1)):
        with pytest.raises(DomainError) as raised:
            pagination.decode_token(bad, 2)
        assert raised.value.reason == "INVALID_PAGE_TOKEN"
    assert pagination.page_size(0) == pagination.DEFAULT_PAGE_SIZE
    assert pagination.page_size(10**6) == pagination.PAGE_SIZE_MAX




async def test_a_shutdown_step_that_hangs_is_cut_off_and_the_shutdown_goes_on() -> None:
    finished: list[str] = []

    async def hangs() -> None:
        await asyncio.Event().wait()  # never set: a stop() that never returns

    async def quick() -> None:
        finished.append("quick")

    await server._bounded("hung stop", hangs(), 0.01)
    await server._bounded("quick stop", quick(), 1.0)
    assert finished == ["quick"]


def test_every_reason_a_use_case_raises_has_its_code() -> None:
    from svc_transfer import service as transfer_service

    for reason in transfer_service.MESSAGES:
        assert errors.refused(reason, "m").code == errors.CODES[reason]
    with pytest.raises(AssertionError):
        errors.refused("NO_SUCH_REASON", "m")
    assert errors.CODES["ACCOUNT_NOT_EMPTY"] is grpc.StatusCode.FAILED_PRECONDITION  # decision 0005


async def test_lookups_of_one_turn_are_one_query_per_chunk_and_each_caller_gets_its_own() -> None:
    queries: list[list[int]] = []

    async def fetch(keys: list[int]) -> dict[int, str]:
        queries.append(keys)
        return {key: f"v{key}" for key in keys if key % 2 == 0}  # odd keys are not found

    lookups = LookupCoalescer(fetch, chunk_max=3)
    answers = await asyncio.gather(lookups.get([1, 2]), lookups.get([2, 4]), lookups.get([6, 8, 10]), lookups.get([]))
    assert list(answers) == [{2: "v2"}, {2: "v2", 4: "v4"}, {6: "v6", 8: "v8", 10: "v10"}, {}]
    assert queries == [[1, 2, 4], [6, 8, 10]]  # each key once, in chunks of at most 3
    assert await lookups.get([4]) == {4: "v4"}  # a later turn: a query of its own
    assert queries[-1] == [4]


async def test_a_failed_lookup_fails_every_caller_of_its_turn_and_the_next_turn_tries_again() -> None:
    calls: list[list[int]] = []

    async def fetch(keys: list[int]) -> dict[int, str]:
        calls.append(keys)
        if len(calls) == 1:
            raise Flaky("down")  # the whole turn's one chunk
        return {key: "found" for key in keys}

    lookups = LookupCoalescer(fetch, chunk_max=10)
    results = await asyncio.gather(lookups.get([1]), lookups.get([2]), return_exceptions=True)
    assert [type(result) for result in results] == [Flaky, Flaky]
    assert await lookups.get([1]) == {1: "found"}


async def test_a_failed_chunk_fails_only_the_callers_of_its_keys() -> None:
    async def fetch(keys: list[int]) -> dict[int, str]:
        if 3 in keys:
            raise Flaky("down")
        return {key: "found" for key in keys}

    lookups = LookupCoalescer(fetch, chunk_max=2)  # chunks [1, 2], [3, 4], [5]
    results = await asyncio.gather(lookups.get([1, 2]), lookups.get([3]), lookups.get([4, 5]),
                                   return_exceptions=True)
    assert results[0] == {1: "found", 2: "found"}
    assert isinstance(results[1], Flaky) and isinstance(results[2], Flaky)  # 4 shared the failed chunk

"""Holds, two-phase transfers (API.md "Holds: two-phase transfers"), against the real ledger:
every rule and reason, the callers who may settle a hold, expiry by the database's clock and
the release worker, the listing and the statement; REST through Envoy and gRPC through Envoy
for each reason a client can meet."""

from __future__ import annotations

import asyncio
import sys
from datetime import timedelta
from typing import Any

import grpc
from bank.events.v1 import events_pb2
from bank.transfer.v1 import ledger_pb2, transfer_pb2

from common.config import Settings
from common.events import TRANSFER_TOPIC
from devstack.stack import Stack
from tests.events_support import (
    deposit,
    holder,
    read_topic,
    service_metric,
    statement_with,
    teller_token,
    topic_ends,
)
from tests.ledger_support import (
    Account,
    Bank,
    age_holds,
    holds_invariants,
    new_request_id,
    refused,
    sql,
    transfer_rows,
)
from tests.support import onboard, rest, until, until_async

Transfer = transfer_pb2.Transfer


async def parties(bank: Bank, funds: int = 1_000) -> tuple[Account, Account]:
    payer, payee = await bank.open_account(), await bank.open_account()
    if funds:
        await bank.deposit(payer, funds)
    return payer, payee


def entries_of(settings: Settings, transfer_id: str) -> list[tuple[str, int]]:
    return [(str(a), amount) for a, amount in sql(
        settings, "SELECT account_id, amount FROM transfer.entries WHERE transfer_id = %s ORDER BY amount",
        (transfer_id,))]


# --- placing -----------------------------------------------------------------------------------

async def test_a_hold_reserves_the_amount_without_moving_it(bank: Bank, settings: Settings) -> None:
    payer, payee = await parties(bank)
    placed = await bank.hold(payer, payee, 700, hold_seconds=600)
    assert (placed.status, placed.amount, placed.held_amount, placed.kind) == (Transfer.PENDING, 700, 700, Transfer.TRANSFER)
    assert placed.expire_time.ToDatetime() - placed.create_time.ToDatetime() == timedelta(seconds=600)
    assert await bank.available(payer, payee) == [(1_000, 300), (0, 0)]  # incoming holds do not count until posted
    assert entries_of(settings, placed.transfer_id) == []  # no ledger entry until it is posted

    # Transfers, withdrawals and new holds are checked against the available balance.
    assert await refused(bank.transfer(payer, payee, 301)) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS")
    assert await refused(bank.withdraw(payer, 301)) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS")
    assert await refused(bank.hold(payer, payee, 301)) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS")
    await bank.transfer(payer, payee, 300)
    assert await bank.available(payer, payee) == [(700, 0), (300, 300)]
    holds_invariants(settings, [payer.account_id, payee.account_id])


async def test_a_retried_placement_returns_the_first_answer_and_reserves_once(bank: Bank) -> None:
    payer, payee = await parties(bank)
    request_id = new_request_id()
    first = await bank.hold(payer, payee, 400, request_id=request_id)
    assert await bank.hold(payer, payee, 400, request_id=request_id) == first
    assert await refused(bank.hold(payer, payee, 400, request_id=request_id, hold_seconds=60)) \
        == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    # The same key without hold_seconds is another request: a transfer is not a hold.
    assert await refused(bank.transfer(payer, payee, 400, request_id=request_id, description="deposit")) \
        == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    assert await bank.available(payer) == [(1_000, 600)]


# --- posting and voiding -------------------------------------------------------------------------

async def test_a_post_moves_all_or_part_as_one_double_entry_transfer_and_releases_the_rest(
        bank: Bank, settings: Settings) -> None:
    payer, payee = await parties(bank)
    partial = await bank.hold(payer, payee, 400)
    whole = await bank.hold(payer, payee, 100)
    posted = await bank.post(partial.transfer_id, bank.customer(payee.customer_id), amount=250)
    assert (posted.transfer_id, posted.status, posted.amount, posted.held_amount) \
        == (partial.transfer_id, Transfer.COMPLETED, 250, 400)
    assert entries_of(settings, partial.transfer_id) == [(payer.account_id, -250), (payee.account_id, 250)]
    assert await bank.available(payer, payee) == [(750, 650), (250, 250)]
    taken = await bank.post(whole.transfer_id, bank.customer(payee.customer_id))  # no amount: all of it
    assert (taken.status, taken.amount) == (Transfer.COMPLETED, 100)
    assert await bank.available(payer, payee) == [(650, 650), (350, 350)]
    holds_invariants(settings, [payer.account_id, payee.account_id])


async def test_more_than_held_is_refused_and_the_hold_stays_pending(bank: Bank) -> None:
    payer, payee = await parties(bank)
    placed = await bank.hold(payer, payee, 400)
    payee_md = bank.customer(payee.customer_id)
    assert await refused(bank.post(placed.transfer_id, payee_md, amount=401)) \
        == (grpc.StatusCode.FAILED_PRECONDITION, "EXCEEDS_HELD_AMOUNT")
    assert await refused(bank.post(placed.transfer_id, payee_md, amount=0)) \
        == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_AMOUNT")
    assert await bank.status_of(placed.transfer_id) == Transfer.PENDING
    assert await bank.available(payer) == [(1_000, 600)]


async def test_a_void_releases_the_whole_hold_and_nothing_moves(bank: Bank, settings: Settings) -> None:
    payer, payee = await parties(bank)
    placed = await bank.hold(payer, payee, 400)
    voided = await bank.void(placed.transfer_id, bank.customer(payee.customer_id))
    assert (voided.status, voided.amount, voided.held_amount) == (Transfer.VOIDED, 400, 400)
    assert await bank.available(payer, payee) == [(1_000, 1_000), (0, 0)]
    assert entries_of(settings, placed.transfer_id) == []


async def test_a_settled_hold_is_not_pending_and_a_retry_returns_the_first_answer(bank: Bank) -> None:
    payer, payee = await parties(bank)
    payee_md = bank.customer(payee.customer_id)
    posted_hold, voided_hold = await bank.hold(payer, payee, 100), await bank.hold(payer, payee, 100)
    post_id, void_id = new_request_id(), new_request_id()
    posted = await bank.post(posted_hold.transfer_id, payee_md, request_id=post_id)
    voided = await bank.void(voided_hold.transfer_id, payee_md, request_id=void_id)
    assert await bank.post(posted_hold.transfer_id, payee_md, request_id=post_id) == posted
    assert await bank.void(voided_hold.transfer_id, payee_md, request_id=void_id) == voided
    for hold_id, name in ((posted_hold.transfer_id, "COMPLETED"), (voided_hold.transfer_id, "VOIDED")):
        for settle in (bank.post(hold_id, payee_md), bank.void(hold_id, payee_md)):
            try:
                await settle
                raise AssertionError("a settled hold was settled again")
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert name in (error.details() or ""), error.details()
    # The post's key with other parameters (another amount, or a void) is a conflict.
    assert await refused(bank.post(posted_hold.transfer_id, payee_md, amount=1, request_id=post_id)) \
        == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    assert await refused(bank.void(posted_hold.transfer_id, payee_md, request_id=post_id)) \
        == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    # A transfer that was never a hold is not pending either.
    plain = await bank.transfer(payer, payee, 10)
    assert await refused(bank.void(plain.transfer_id, payee_md)) \
        == (grpc.StatusCode.FAILED_PRECONDITION, "TRANSFER_NOT_PENDING")
    assert await bank.available(payer, payee) == [(890, 890), (110, 110)]


async def test_the_payee_or_a_teller_settles_the_payer_cannot_and_a_stranger_sees_nothing(bank: Bank) -> None:
    payer, payee = await parties(bank)
    stranger = await bank.open_account()
    placed = [await bank.hold(payer, payee, 100) for _ in range(3)]
    payer_md, payee_md, stranger_md = (bank.customer(a.customer_id) for a in (payer, payee, stranger))
    for settle in (bank.post, bank.void):
        assert await refused(settle(placed[0].transfer_id, payer_md)) \
            == (grpc.StatusCode.FAILED_PRECONDITION, "NOT_PAYEE")
        assert await refused(settle(placed[0].transfer_id, stranger_md)) \
            == (grpc.StatusCode.NOT_FOUND, "TRANSFER_NOT_FOUND")
    assert await refused(bank.post("not-a-uuid", payee_md)) == (grpc.StatusCode.NOT_FOUND, "TRANSFER_NOT_FOUND")
    assert (await bank.post(placed[0].transfer_id, payee_md)).status == Transfer.COMPLETED
    assert (await bank.post(placed[1].transfer_id, bank.teller, amount=40)).amount == 40
    assert (await bank.void(placed[2].transfer_id, bank.teller)).status == Transfer.VOIDED
    # A customer who owns both accounts is the payee too.
    own = await bank.open_account(customer_id=payer.customer_id)
    mine = await bank.hold(payer, own, 50)
    assert (await bank.void(mine.transfer_id, payer_md)).status == Transfer.VOIDED
    assert await bank.available(payer, payee) == [(860, 860), (140, 140)]


async def test_a_frozen_payee_cannot_be_paid_and_the_hold_stays_pending(bank: Bank) -> None:
    payer, payee = await parties(bank)
    placed = await bank.hold(payer, payee, 100)
    await bank.set_status(payee, ledger_pb2.LedgerAccount.FROZEN)
    assert await refused(bank.post(placed.transfer_id, bank.teller)) \
        == (grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_INACTIVE")
    assert await bank.status_of(placed.transfer_id) == Transfer.PENDING
    await bank.set_status(payee, ledger_pb2.LedgerAccount.ACTIVE)
    assert (await bank.post(placed.transfer_id, bank.teller)).status == Transfer.COMPLETED
    assert await bank.available(payer, payee) == [(900, 900), (100, 100)]


async def test_an_account_with_a_pending_hold_on_either_side_cannot_be_closed(bank: Bank) -> None:
    payer, payee = await parties(bank, funds=100)
    placed = await bank.hold(payer, payee, 100)
    assert await refused(bank.withdraw(payer, 1)) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS")
    for account in (payee, payer):
        assert await refused(bank.set_status(account, ledger_pb2.LedgerAccount.CLOSED)) \
            == (grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_NOT_EMPTY")
    await bank.void(placed.transfer_id, bank.teller)
    closed = await bank.set_status(payee, ledger_pb2.LedgerAccount.CLOSED)  # balance 0, nothing pending
    assert closed.status == ledger_pb2.LedgerAccount.CLOSED


# --- expiry ------------------------------------------------------------------------------------

async def test_a_lapsed_hold_is_refused_at_once_and_released_within_seconds(bank: Bank, settings: Settings) -> None:
    payer, payee = await parties(bank)
    lapsing, lasting = await bank.hold(payer, payee, 300, hold_seconds=60), await bank.hold(payer, payee, 200)
    age_holds(settings, [lapsing.transfer_id], 60)  # its expire_time is now
    # The database's clock decides: refused whether or not the worker released it yet.
    for settle in (bank.post, bank.void):
        assert await refused(settle(lapsing.transfer_id, bank.customer(payee.customer_id))) \
            == (grpc.StatusCode.FAILED_PRECONDITION, "HOLD_EXPIRED")

    def expired() -> bool | None:
        return transfer_rows(settings, [lapsing.transfer_id])[lapsing.transfer_id].status == "EXPIRED" or None

    await asyncio.to_thread(until, expired, "the lapsed hold released")  # the worker looks every second
    assert await bank.status_of(lapsing.transfer_id) == Transfer.EXPIRED
    assert await bank.status_of(lasting.transfer_id) == Transfer.PENDING
    assert await bank.available(payer, payee) == [(1_000, 800), (0, 0)]
    assert await refused(bank.void(lapsing.transfer_id, bank.teller)) \
        == (grpc.StatusCode.FAILED_PRECONDITION, "HOLD_EXPIRED")
    holds_invariants(settings, [payer.account_id, payee.account_id])


async def test_holds_lapsed_while_the_ledger_was_down_are_released_on_its_next_start(
        stack: Stack, bank: Bank, settings: Settings) -> None:
    payer, payee = await parties(bank)
    held = [(await bank.hold(payer, payee, 100, hold_seconds=60)).transfer_id for _ in range(5)]
    customer = await asyncio.to_thread(onboard, settings)
    stack.down(["svc_transfer"], out=sys.stderr)
    try:
        age_holds(settings, held, 120)
        assert [row.status for row in transfer_rows(settings, held).values()] == ["PENDING"] * 5
    finally:
        await stack.up(["svc_transfer"], out=sys.stderr)
        # The stack as the next tests expect it: svc_account's channel to the ledger is back too
        # (until then CreateAccount answers 503 DEPENDENCY_UNAVAILABLE, as it should).
        await asyncio.to_thread(until, lambda: rest(settings, "POST", "/v1/accounts", {"currency": "USD"},
                                                    token=customer.token).status == 200 or None,
                                "svc_account reaching the restarted ledger", 30)
    await asyncio.to_thread(
        until, lambda: [row.status for row in transfer_rows(settings, held).values()] == ["EXPIRED"] * 5 or None,
        "the lapsed holds released", 30)
    assert await bank.available(payer) == [(1_000, 1_000)]
    holds_invariants(settings, [payer.account_id])
    # The worker's lag gauge is back to 0 once nothing lapsed waits.
    await asyncio.to_thread(
        until, lambda: service_metric(settings, "transfer", "ledger_holds_release_lag_seconds") == 0 or None,
        "the release lag back to 0")


# --- listing, statement, REST -------------------------------------------------------------------

def test_holds_over_rest_through_envoy_with_each_reason(settings: Settings) -> None:
    payer, payee, stranger = holder(settings), holder(settings), onboard(settings)
    teller = teller_token(settings)
    source, target = payer.account_id, payee.account_id
    deposit(settings, teller, source, 1_000)
    body = {"from_account_id": source, "to_account_id": target, "amount": "600", "currency": "USD",
            "description": "hotel deposit", "hold_seconds": 3600}
    placed = rest(settings, "POST", "/v1/transfers", {**body, "request_id": new_request_id()}, token=payer.token)
    assert placed.status == 200, placed.body
    assert (placed.body["status"], placed.body["held_amount"], placed.body["amount"]) == ("PENDING", "600", "600")
    assert placed.body["expire_time"]
    hold_id = placed.body["transfer_id"]
    shown = rest(settings, "GET", f"/v1/accounts/{source}", token=payer.token).body
    assert (shown["balance"], shown["available_balance"]) == ("1000", "400")

    def settle(verb: str, token: str, extra: dict[str, Any] | None = None) -> Any:
        return rest(settings, "POST", f"/v1/transfers/{hold_id}:{verb}",
                    {"request_id": new_request_id(), **(extra or {})}, token=token)

    errors = [
        (rest(settings, "POST", "/v1/transfers", {**body, "request_id": new_request_id(), "hold_seconds": 59},
              token=payer.token), 400, None),
        (rest(settings, "POST", "/v1/transfers", {**body, "request_id": new_request_id(), "amount": "401"},
              token=payer.token), 400, "INSUFFICIENT_FUNDS"),
        (settle("post", payer.token), 400, "NOT_PAYEE"),
        (settle("void", stranger.token), 404, "TRANSFER_NOT_FOUND"),
        (settle("post", payee.token, {"amount": "601"}), 400, "EXCEEDS_HELD_AMOUNT"),
        (settle("post", payee.token, {"amount": "0"}), 400, "INVALID_AMOUNT"),
        (rest(settings, "POST", f"/v1/transfers/{hold_id}:post", {"request_id": new_request_id()}), 401, None),
        (rest(settings, "POST", f"/v1/accounts/{target}:close", {}, token=payee.token), 400, "ACCOUNT_NOT_EMPTY"),
    ]
    for response, status, reason in errors:
        assert response.status == status, response.body
        if reason is not None:
            assert response.reason == reason, response.body
    posted = settle("post", payee.token, {"amount": "450"})
    assert posted.status == 200, posted.body
    assert (posted.body["status"], posted.body["amount"], posted.body["held_amount"]) == ("COMPLETED", "450", "600")
    again = settle("void", payee.token)
    assert (again.status, again.reason) == (400, "TRANSFER_NOT_PENDING") and "COMPLETED" in again.body["message"]
    other = rest(settings, "POST", "/v1/transfers", {**body, "amount": "100", "request_id": new_request_id()},
                 token=payer.token).body["transfer_id"]
    voided = rest(settings, "POST", f"/v1/transfers/{other}:void", {"request_id": new_request_id()}, token=teller)
    assert voided.status == 200 and voided.body["status"] == "VOIDED", voided.body

    # ListTransfers shows holds in every status, newest first; the statement only what moved.
    listed = rest(settings, "GET", f"/v1/accounts/{source}/transfers", token=payer.token).body["transfers"]
    assert [(t["transfer_id"], t["status"]) for t in listed[:2]] == [(other, "VOIDED"), (hold_id, "COMPLETED")]
    shown = rest(settings, "GET", f"/v1/accounts/{source}", token=payer.token).body
    assert (shown["balance"], shown["available_balance"]) == ("550", "550")
    [line] = statement_with(settings, payee.token, target, 1)
    assert (line["transfer_id"], line["amount"]) == (hold_id, "450")
    assert len(statement_with(settings, payer.token, source, 2)) == 2  # the deposit and the post


async def test_holds_over_grpc_through_envoy(bank: Bank, settings: Settings) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.envoy_port}") as gateway_channel:
        gateway = Bank(settings, gateway_channel)
        gateway.ledger = bank.ledger  # internal: never through Envoy
        payer, payee = await parties(gateway, 500)
        placed = await gateway.hold(payer, payee, 500)
        assert await refused(gateway.post(placed.transfer_id, gateway.customer(payer.customer_id))) \
            == (grpc.StatusCode.FAILED_PRECONDITION, "NOT_PAYEE")
        assert (await gateway.post(placed.transfer_id, gateway.customer(payee.customer_id), 120)).amount == 120
        assert await gateway.available(payer, payee) == [(380, 380), (120, 120)]


# --- events --------------------------------------------------------------------------------------

async def test_each_change_of_a_hold_is_one_event_and_a_post_also_moves_money(bank: Bank, settings: Settings) -> None:
    """On bank.transfer.v1, keyed by the hold: HoldPlaced, then HoldPosted and the MoneyMoved a
    transfer emits (statements and transfer emails need nothing new), or HoldVoided, or
    HoldExpired; each once, in that order."""
    since = await topic_ends(settings, TRANSFER_TOPIC)  # only what follows is read
    payer, payee = await parties(bank)
    posted = await bank.hold(payer, payee, 400, hold_seconds=60)
    voided = await bank.hold(payer, payee, 300, hold_seconds=60)
    lapsed = await bank.hold(payer, payee, 200, hold_seconds=60)
    await bank.post(posted.transfer_id, bank.customer(payee.customer_id), amount=250)
    await bank.void(voided.transfer_id, bank.teller)
    age_holds(settings, [lapsed.transfer_id], 60)
    expected = {posted.transfer_id: ["HoldPlaced", "HoldPosted", "MoneyMoved"],
                voided.transfer_id: ["HoldPlaced", "HoldVoided"], lapsed.transfer_id: ["HoldPlaced", "HoldExpired"]}

    async def of_the_holds() -> dict[str, list[tuple[str, bytes]]]:
        seen: dict[str, list[tuple[str, bytes]]] = {key: [] for key in expected}
        for record in await read_topic(settings, TRANSFER_TOPIC, since):
            key = (record.key or b"").decode()
            if key in seen:
                event_type = dict(record.headers)["event_type"].decode().removeprefix("bank.events.v1.")
                seen[key].append((event_type, record.value or b""))
        return seen

    async def all_in() -> dict[str, list[tuple[str, bytes]]] | None:
        seen = await of_the_holds()
        return seen if sum(map(len, seen.values())) >= sum(map(len, expected.values())) else None

    seen = await until_async(all_in, "an event for each change of the holds", 30, 0.5)
    await asyncio.sleep(1)  # nothing more comes: one event per change
    assert await of_the_holds() == seen, "a second event for one change"
    assert {key: [t for t, _ in events] for key, events in seen.items()} == expected

    placed = events_pb2.HoldPlaced.FromString(seen[posted.transfer_id][0][1])
    assert (placed.held_amount, placed.from_account_id, placed.to_account_id, placed.from_customer_id) \
        == (400, payer.account_id, payee.account_id, payer.customer_id)
    assert placed.expire_time.ToDatetime() - placed.create_time.ToDatetime() == timedelta(seconds=60)
    taken = events_pb2.HoldPosted.FromString(seen[posted.transfer_id][1][1])
    assert (taken.amount, taken.held_amount, taken.to_customer_id) == (250, 400, payee.customer_id)
    moved = events_pb2.MoneyMoved.FromString(seen[posted.transfer_id][2][1])
    assert (moved.kind, moved.amount, moved.from_balance_after, moved.to_balance_after) \
        == (events_pb2.MoneyMoved.TRANSFER, 250, 750, 250)
    assert moved.create_time == taken.create_time  # the money moved when the hold was posted
    released = events_pb2.HoldVoided.FromString(seen[voided.transfer_id][1][1])
    assert (released.held_amount, released.from_customer_id) == (300, payer.customer_id)
    expired = events_pb2.HoldExpired.FromString(seen[lapsed.transfer_id][1][1])
    assert expired.held_amount == 200 and expired.create_time.ToDatetime() >= expired.expire_time.ToDatetime()

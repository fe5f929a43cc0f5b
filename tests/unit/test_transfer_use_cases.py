"""svc_transfer's use cases (service.py) against the fake ledger: input refused before the
store, the store's refusals turned into reasons, who sees which movement, pages."""

from __future__ import annotations

import uuid
from datetime import timedelta

import grpc
import pytest

from common.auth import Caller, Role
from common.ids import REQUEST_ID_LENGTH_MAX
from svc_transfer import service
from tests.unit.fakes import FakeLedger
from tests.unit.support import refusal

TELLER = Caller("teller-1", Role.TELLER, "s-teller")


def customer() -> Caller:
    return Caller(str(uuid.uuid4()), Role.CUSTOMER, str(uuid.uuid4()))


async def funded(ledger: FakeLedger, owner: Caller, amount: int, currency: str = "USD") -> str:
    account_id = str(uuid.uuid4())
    assert owner.customer_id is not None
    await service.open_ledger_account(ledger, account_id=account_id, customer_id=owner.customer_id, currency=currency)
    if amount:
        await service.create_deposit(ledger, TELLER, request_id=f"fund-{account_id}", account_id=account_id,
                                     amount=amount, currency=currency, description="")
    return account_id


async def test_a_transfer_moves_money_once_per_request_id(ledger: FakeLedger) -> None:
    alice, bob = customer(), customer()
    source, target = await funded(ledger, alice, 100), await funded(ledger, bob, 0)
    first = await service.create_transfer(ledger, alice, request_id="r1", from_account_id=source,
                                          to_account_id=target, amount=30, currency="USD", description="rent")
    again = await service.create_transfer(ledger, alice, request_id="r1", from_account_id=source,
                                          to_account_id=target, amount=30, currency="USD", description="rent")
    assert again == first
    assert (ledger.balance(source), ledger.balance(target)) == (70, 30)
    reused = await refusal(service.create_transfer(ledger, alice, request_id="r1", from_account_id=source,
                                                   to_account_id=target, amount=31, currency="USD", description="rent"))
    assert (reused.code, reused.reason) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")


@pytest.mark.parametrize(("change", "code", "reason"), [
    ({"amount": 0}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_AMOUNT"),
    ({"amount": -5}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_AMOUNT"),
    ({"request_id": ""}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ({"request_id": "r" * (REQUEST_ID_LENGTH_MAX + 1)}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ({"currency": "usd"}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ({"description": "d" * 201}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ({"to_account_id": "not-a-uuid"}, grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND"),
    ({"amount": 101}, grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS"),
    ({"currency": "EUR"}, grpc.StatusCode.FAILED_PRECONDITION, "CURRENCY_MISMATCH"),
])
async def test_a_refused_transfer_says_why_and_moves_nothing(ledger: FakeLedger, change: dict[str, object],
                                                             code: grpc.StatusCode, reason: str) -> None:
    alice = customer()
    source, target = await funded(ledger, alice, 100), await funded(ledger, customer(), 0)
    request = {"request_id": "r1", "from_account_id": source, "to_account_id": target, "amount": 10,
               "currency": "USD", "description": "", **change}
    error = await refusal(service.create_transfer(ledger, alice, **request))  # type: ignore[arg-type]
    assert (error.code, error.reason) == (code, reason)
    assert (ledger.balance(source), ledger.balance(target)) == (100, 0)


async def test_only_the_owner_moves_money_out(ledger: FakeLedger) -> None:
    alice, mallory = customer(), customer()
    source, target = await funded(ledger, alice, 100), await funded(ledger, mallory, 0)
    for caller in (mallory, TELLER):
        error = await refusal(service.create_transfer(ledger, caller, request_id="steal", from_account_id=source,
                                                      to_account_id=target, amount=1, currency="USD", description=""))
        assert error.reason == "ACCOUNT_NOT_FOUND"  # someone else's account does not exist for them
    same = await refusal(service.create_transfer(ledger, alice, request_id="r", from_account_id=source,
                                                 to_account_id=source, amount=1, currency="USD", description=""))
    assert same.reason == "SAME_ACCOUNT"
    assert ledger.balance(source) == 100


async def test_a_frozen_account_neither_sends_nor_receives(ledger: FakeLedger) -> None:
    alice = customer()
    source, target = await funded(ledger, alice, 100), await funded(ledger, customer(), 0)
    await service.set_ledger_account_status(ledger, account_id=target, status="FROZEN")
    error = await refusal(service.create_transfer(ledger, alice, request_id="r", from_account_id=source,
                                                  to_account_id=target, amount=1, currency="USD", description=""))
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_INACTIVE")


async def test_a_busy_ledger_is_unavailable_and_worth_a_retry(ledger: FakeLedger) -> None:
    alice = customer()
    source, target = await funded(ledger, alice, 100), await funded(ledger, customer(), 0)
    ledger.busy = True
    error = await refusal(service.create_transfer(ledger, alice, request_id="r", from_account_id=source,
                                                  to_account_id=target, amount=1, currency="USD", description=""))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "LEDGER_BUSY")
    ledger.busy = False
    moved = await service.create_transfer(ledger, alice, request_id="r", from_account_id=source,
                                          to_account_id=target, amount=1, currency="USD", description="")
    assert moved.amount == 1 and ledger.balance(target) == 1


async def test_cash_accounts_are_never_shown(ledger: FakeLedger) -> None:
    alice = customer()
    account = await funded(ledger, alice, 0)
    deposit = await service.create_deposit(ledger, TELLER, request_id="d", account_id=account, amount=50,
                                           currency="USD", description="")
    withdrawal = await service.create_withdrawal(ledger, TELLER, request_id="w", account_id=account, amount=20,
                                                 currency="USD", description="")
    assert (deposit.from_account_id, deposit.to_account_id) == ("", account)
    assert (withdrawal.from_account_id, withdrawal.to_account_id) == (account, "")
    seen = await service.get_transfer(ledger, alice, deposit.transfer_id)
    assert seen.from_account_id == "" and ledger.balance(account) == 30
    too_much = await refusal(service.create_withdrawal(ledger, TELLER, request_id="w2", account_id=account, amount=31,
                                                       currency="USD", description=""))
    assert too_much.reason == "INSUFFICIENT_FUNDS"


async def test_a_transfer_is_seen_by_its_two_parties_and_tellers_only(ledger: FakeLedger) -> None:
    alice, bob = customer(), customer()
    source, target = await funded(ledger, alice, 10), await funded(ledger, bob, 0)
    moved = await service.create_transfer(ledger, alice, request_id="r", from_account_id=source,
                                          to_account_id=target, amount=10, currency="USD", description="")
    for caller in (alice, bob, TELLER):
        assert (await service.get_transfer(ledger, caller, moved.transfer_id)).transfer_id == moved.transfer_id
    for caller, transfer_id in ((customer(), moved.transfer_id), (alice, str(uuid.uuid4())), (alice, "x")):
        error = await refusal(service.get_transfer(ledger, caller, transfer_id))
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "TRANSFER_NOT_FOUND")


async def test_pages_list_every_movement_once_newest_first(ledger: FakeLedger) -> None:
    alice = customer()
    source, target = await funded(ledger, alice, 100), await funded(ledger, customer(), 0)
    for n in range(7):
        await service.create_transfer(ledger, alice, request_id=f"r{n}", from_account_id=source,
                                      to_account_id=target, amount=n + 1, currency="USD", description="")
    seen, token = [], ""
    for _ in range(10):  # bounded: 8 movements in pages of 3 take 3 pages
        page, token = await service.list_transfers(ledger, alice, account_id=source, page_size=3, page_token=token)
        seen += page
        if not token:
            break
    assert [t.amount for t in seen] == [7, 6, 5, 4, 3, 2, 1, 100]
    other = await funded(ledger, alice, 0)
    _, token = await service.list_transfers(ledger, alice, account_id=source, page_size=3, page_token="")
    wrong = await refusal(service.list_transfers(ledger, alice, account_id=other, page_size=3, page_token=token))
    assert wrong.reason == "INVALID_PAGE_TOKEN"
    hidden = await refusal(service.list_transfers(ledger, customer(), account_id=source, page_size=3, page_token=""))
    assert hidden.reason == "ACCOUNT_NOT_FOUND"


async def test_ledger_accounts_open_once_and_close_only_when_empty(ledger: FakeLedger) -> None:
    alice = customer()
    assert alice.customer_id is not None
    account = await funded(ledger, alice, 5)
    again = await service.open_ledger_account(ledger, account_id=account, customer_id=alice.customer_id,
                                              currency="USD")
    assert again.balance == 5
    other = await refusal(service.open_ledger_account(ledger, account_id=account, customer_id=alice.customer_id,
                                                      currency="EUR"))
    assert (other.code, other.reason) == (grpc.StatusCode.ALREADY_EXISTS, "ACCOUNT_ALREADY_EXISTS")
    for currency in ("XYZ", "usd"):
        error = await refusal(service.open_ledger_account(ledger, account_id=str(uuid.uuid4()),
                                                          customer_id=alice.customer_id, currency=currency))
        assert error.reason == "UNSUPPORTED_CURRENCY"
    full = await refusal(service.set_ledger_account_status(ledger, account_id=account, status="CLOSED"))
    assert (full.code, full.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_NOT_EMPTY")
    bad = await refusal(service.set_ledger_account_status(ledger, account_id=account, status="OPEN"))
    assert bad.reason == "INVALID_ARGUMENT"


async def test_batch_get_is_all_or_nothing_and_bounded(ledger: FakeLedger) -> None:
    alice = customer()
    first, second = await funded(ledger, alice, 1), await funded(ledger, alice, 2)
    found = await service.batch_get_ledger_accounts(ledger, [second, first])
    assert [a.balance for a in found] == [2, 1]
    missing = str(uuid.uuid4())
    error = await refusal(service.batch_get_ledger_accounts(ledger, [first, missing]))
    assert (error.reason, error.metadata) == ("ACCOUNT_NOT_FOUND", {"account_id": missing})
    for ids in ([], [first] * (service.BATCH_GET_SIZE_MAX + 1)):
        assert (await refusal(service.batch_get_ledger_accounts(ledger, ids))).reason == "INVALID_ARGUMENT"


# --- Holds (API.md "Holds: two-phase transfers") -------------------------------------------

async def placed(ledger: FakeLedger, payer: Caller, source: str, target: str, amount: int,
                 request_id: str = "h1", hold_seconds: int = 3600) -> str:
    hold = await service.create_transfer(ledger, payer, request_id=request_id, from_account_id=source,
                                         to_account_id=target, amount=amount, currency="USD", description="deposit",
                                         hold_seconds=hold_seconds)
    assert (hold.status, hold.held_amount, hold.amount) == ("PENDING", amount, amount)
    assert hold.expire_time == hold.create_time + timedelta(seconds=hold_seconds)
    return hold.transfer_id


async def test_a_hold_lowers_the_available_balance_only_and_transfers_are_checked_against_it(
        ledger: FakeLedger) -> None:
    alice, bob = customer(), customer()
    source, target = await funded(ledger, alice, 100), await funded(ledger, bob, 0)
    await placed(ledger, alice, source, target, 70)
    payer, payee = ledger.accounts[source], ledger.accounts[target]
    assert (payer.balance, payer.available_balance, payee.balance, payee.available_balance) == (100, 30, 0, 0)
    short = await refusal(service.create_transfer(ledger, alice, request_id="t1", from_account_id=source,
                                                  to_account_id=target, amount=31, currency="USD", description=""))
    assert short.reason == "INSUFFICIENT_FUNDS"
    second = await refusal(placed(ledger, alice, source, target, 31, request_id="h2"))
    assert second.reason == "INSUFFICIENT_FUNDS"
    closing = await refusal(service.set_ledger_account_status(ledger, account_id=target, status="CLOSED"))
    assert closing.reason == "ACCOUNT_NOT_EMPTY"  # a pending hold on either side forbids a close


async def test_a_partial_post_moves_part_releases_the_rest_and_replays_its_first_answer(ledger: FakeLedger) -> None:
    alice, bob = customer(), customer()
    source, target = await funded(ledger, alice, 100), await funded(ledger, bob, 0)
    hold_id = await placed(ledger, alice, source, target, 70)
    posted = await service.post_transfer(ledger, bob, transfer_id=hold_id, request_id="p1", amount=50)
    assert (posted.status, posted.amount, posted.held_amount) == ("COMPLETED", 50, 70)
    assert (ledger.balance(source), ledger.accounts[source].available_balance, ledger.balance(target)) == (50, 50, 50)
    assert await service.post_transfer(ledger, bob, transfer_id=hold_id, request_id="p1", amount=50) == posted
    again = await refusal(service.post_transfer(ledger, bob, transfer_id=hold_id, request_id="p2", amount=None))
    assert (again.code, again.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "TRANSFER_NOT_PENDING")
    assert "COMPLETED" in again.message
    reused = await refusal(service.void_transfer(ledger, bob, transfer_id=hold_id, request_id="p1"))
    assert reused.reason == "IDEMPOTENCY_KEY_REUSED"


@pytest.mark.parametrize(("who", "reason"), [("payer", "NOT_PAYEE"), ("stranger", "TRANSFER_NOT_FOUND"),
                                             ("payee", None), ("teller", None)])
async def test_only_the_payee_or_a_teller_settles_a_hold(ledger: FakeLedger, who: str, reason: str | None) -> None:
    alice, bob = customer(), customer()
    source, target = await funded(ledger, alice, 100), await funded(ledger, bob, 0)
    hold_id = await placed(ledger, alice, source, target, 40)
    caller = {"payer": alice, "payee": bob, "stranger": customer(), "teller": TELLER}[who]
    if reason is None:
        await service.void_transfer(ledger, caller, transfer_id=hold_id, request_id="v1")
    else:
        assert (await refusal(service.void_transfer(ledger, caller, transfer_id=hold_id, request_id="v1"))).reason \
            == reason
        assert (await refusal(service.post_transfer(ledger, caller, transfer_id=hold_id, request_id="p1",
                                                    amount=None))).reason == reason
    assert ledger.accounts[source].available_balance == (60 if reason else 100)


async def test_the_owner_of_both_accounts_is_the_payee(ledger: FakeLedger) -> None:
    alice = customer()
    source, target = await funded(ledger, alice, 100), await funded(ledger, alice, 0)
    hold_id = await placed(ledger, alice, source, target, 40)
    voided = await service.void_transfer(ledger, alice, transfer_id=hold_id, request_id="v1")
    assert voided.status == "VOIDED" and ledger.accounts[source].available_balance == 100


async def test_a_lapsed_hold_cannot_be_settled_even_before_its_release(ledger: FakeLedger) -> None:
    alice, bob = customer(), customer()
    source, target = await funded(ledger, alice, 100), await funded(ledger, bob, 0)
    hold_id = await placed(ledger, alice, source, target, 40, hold_seconds=60)
    ledger.advance(60)
    late = await refusal(service.post_transfer(ledger, bob, transfer_id=hold_id, request_id="p1", amount=None))
    assert (late.code, late.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "HOLD_EXPIRED")
    assert ledger.accounts[source].available_balance == 60  # not released yet
    assert ledger.release_lapsed() == 1 and ledger.release_lapsed() == 0
    assert ledger.accounts[source].available_balance == 100 and ledger.balance(target) == 0
    late = await refusal(service.void_transfer(ledger, bob, transfer_id=hold_id, request_id="v1"))
    assert late.reason == "HOLD_EXPIRED"


@pytest.mark.parametrize(("call", "reason"), [
    ({"amount": 41}, "EXCEEDS_HELD_AMOUNT"),
    ({"amount": 0}, "INVALID_AMOUNT"),
    ({"transfer_id": "not-a-uuid"}, "TRANSFER_NOT_FOUND"),
    ({"transfer_id": str(uuid.uuid4())}, "TRANSFER_NOT_FOUND"),
    ({"request_id": ""}, "INVALID_ARGUMENT"),
])
async def test_a_post_refuses_bad_input(ledger: FakeLedger, call: dict[str, object], reason: str) -> None:
    alice, bob = customer(), customer()
    source, target = await funded(ledger, alice, 100), await funded(ledger, bob, 0)
    hold_id = await placed(ledger, alice, source, target, 40)
    arguments: dict[str, object] = {"transfer_id": hold_id, "request_id": "p1", "amount": None, **call}
    assert (await refusal(service.post_transfer(ledger, bob, **arguments))).reason == reason  # type: ignore[arg-type]
    assert ledger.accounts[source].available_balance == 60


@pytest.mark.parametrize("hold_seconds", [0, 59, 604801, -1])
async def test_hold_seconds_outside_a_minute_to_a_week_are_refused(ledger: FakeLedger, hold_seconds: int) -> None:
    alice, bob = customer(), customer()
    source, target = await funded(ledger, alice, 100), await funded(ledger, bob, 0)
    wrong = await refusal(placed(ledger, alice, source, target, 10, hold_seconds=hold_seconds))
    assert (wrong.code, wrong.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")

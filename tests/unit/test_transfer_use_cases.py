"""svc_transfer's use cases (service.py) against the fake ledger: input refused before the
store, the store's refusals turned into reasons, who sees which movement, pages."""

from __future__ import annotations

import uuid

import grpc
import pytest

from common.auth import Caller, Role
from common.errors import DomainError
from common.ids import REQUEST_ID_LENGTH_MAX
from svc_transfer import service
from tests.unit.fakes import FakeLedger

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


async def refusal(call: object) -> DomainError:
    with pytest.raises(DomainError) as raised:
        await call  # type: ignore[misc]
    return raised.value


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

"""svc_account's use cases (service.py) against fakes of its store and of the services it
calls: who may open, see, close and freeze an account, and what the ledger says back."""

from __future__ import annotations

import uuid

import grpc
import pytest
from bank.transfer.v1 import ledger_pb2

from common.auth import Caller, Role
from svc_account import clients, service
from svc_transfer import service as ledger_service
from tests.unit.fakes import FakeAccounts, FakeCustomers, FakeLedger, FakeLedgerClient
from tests.unit.support import refusal

TELLER = Caller("teller-1", Role.TELLER, "s-teller")


@pytest.fixture
def alice(customers: FakeCustomers) -> Caller:
    caller = Caller(str(uuid.uuid4()), Role.CUSTOMER, "s-alice")
    customers.verified.add(caller.subject)
    return caller


async def test_a_verified_customer_opens_an_empty_active_account_in_both_services(
        accounts: FakeAccounts, ledger_client: FakeLedgerClient, customers: FakeCustomers, ledger: FakeLedger,
        alice: Caller) -> None:
    view = await service.create_account(accounts, ledger_client, customers, alice, " eur ")
    assert (view.account.currency, view.balance, view.status) == ("EUR", 0, "ACTIVE")
    assert str(view.account.account_id) in ledger.accounts  # the ledger knows it: a transfer can reach it
    assert await service.get_account(accounts, ledger_client, alice, str(view.account.account_id)) == view


@pytest.mark.parametrize(("currency", "verified", "who", "code", "reason"), [
    ("XYZ", True, "customer", grpc.StatusCode.INVALID_ARGUMENT, "UNSUPPORTED_CURRENCY"),
    ("USD", False, "customer", grpc.StatusCode.FAILED_PRECONDITION, "EMAIL_NOT_VERIFIED"),
    ("USD", True, "teller", grpc.StatusCode.PERMISSION_DENIED, "CUSTOMER_ONLY"),
])
async def test_an_account_is_refused_with_its_reason_and_opened_nowhere(
        accounts: FakeAccounts, ledger_client: FakeLedgerClient, customers: FakeCustomers, ledger: FakeLedger,
        alice: Caller, currency: str, verified: bool, who: str, code: grpc.StatusCode, reason: str) -> None:
    if not verified:
        customers.verified.clear()
    caller = alice if who == "customer" else TELLER
    error = await refusal(service.create_account(accounts, ledger_client, customers, caller, currency))
    assert (error.code, error.reason) == (code, reason)
    assert not accounts.rows and not ledger.accounts


async def test_another_customers_account_does_not_exist_for_them(
        accounts: FakeAccounts, ledger_client: FakeLedgerClient, customers: FakeCustomers, alice: Caller) -> None:
    view = await service.create_account(accounts, ledger_client, customers, alice, "USD")
    account_id = str(view.account.account_id)
    mallory = Caller(str(uuid.uuid4()), Role.CUSTOMER, "s-mallory")
    for call in (service.get_account(accounts, ledger_client, mallory, account_id),
                 service.close_account(accounts, ledger_client, mallory, account_id),
                 service.get_account(accounts, ledger_client, alice, "not-a-uuid"),
                 service.close_account(accounts, ledger_client, TELLER, account_id)):  # closing is the owner's act
        error = await refusal(call)
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    assert (await service.get_account(accounts, ledger_client, TELLER, account_id)).status == "ACTIVE"


async def test_only_an_empty_account_closes_and_a_closed_one_stays_closed(
        accounts: FakeAccounts, ledger_client: FakeLedgerClient, customers: FakeCustomers, ledger: FakeLedger,
        alice: Caller) -> None:
    view = await service.create_account(accounts, ledger_client, customers, alice, "USD")
    account_id = str(view.account.account_id)
    await ledger_service.create_deposit(ledger, TELLER, request_id="d", account_id=account_id, amount=5,
                                        currency="USD", description="")
    full = await refusal(service.close_account(accounts, ledger_client, alice, account_id))
    assert (full.code, full.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_NOT_EMPTY")
    await ledger_service.create_withdrawal(ledger, TELLER, request_id="w", account_id=account_id, amount=5,
                                           currency="USD", description="")
    closed = await service.close_account(accounts, ledger_client, alice, account_id)
    assert (closed.status, accounts.rows[view.account.account_id].status) == ("CLOSED", "CLOSED")
    again = await refusal(service.freeze_account(accounts, ledger_client, TELLER, account_id, frozen=False))
    assert again.reason == "ACCOUNT_INACTIVE"


async def test_a_teller_freezes_and_unfreezes_and_the_ledger_agrees(
        accounts: FakeAccounts, ledger_client: FakeLedgerClient, customers: FakeCustomers, ledger: FakeLedger,
        alice: Caller) -> None:
    view = await service.create_account(accounts, ledger_client, customers, alice, "USD")
    account_id = str(view.account.account_id)
    frozen = await service.freeze_account(accounts, ledger_client, TELLER, account_id, frozen=True)
    assert (frozen.status, ledger.accounts[account_id].status) == ("FROZEN", "FROZEN")
    thawed = await service.freeze_account(accounts, ledger_client, TELLER, account_id, frozen=False)
    assert (thawed.status, ledger.accounts[account_id].status) == ("ACTIVE", "ACTIVE")


async def test_account_pages_list_each_account_once_newest_first(
        accounts: FakeAccounts, ledger_client: FakeLedgerClient, customers: FakeCustomers, alice: Caller) -> None:
    opened = [await service.create_account(accounts, ledger_client, customers, alice, "USD") for _ in range(5)]
    seen, token = [], ""
    for _ in range(10):  # bounded: 5 accounts in pages of 2
        page, token = await service.list_accounts(accounts, ledger_client, alice, 2, token)
        seen += page
        if not token:
            break
    assert [v.account.account_id for v in seen] == [v.account.account_id for v in reversed(opened)]
    assert await service.list_accounts(accounts, ledger_client, TELLER, 2, "") == ([], "")
    bad = await refusal(service.list_accounts(accounts, ledger_client, alice, 2, "bm90LWEta2V5"))
    assert bad.reason == "INVALID_PAGE_TOKEN"


async def test_an_unavailable_ledger_is_a_dependency_unavailable_and_nothing_is_opened(
        accounts: FakeAccounts, ledger_client: FakeLedgerClient, customers: FakeCustomers, ledger: FakeLedger,
        alice: Caller) -> None:
    ledger.busy = True
    error = await refusal(service.create_account(accounts, ledger_client, customers, alice, "USD"))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "DEPENDENCY_UNAVAILABLE")
    assert not accounts.rows  # the ledger first: nothing local without it


def test_the_available_balance_is_read_from_the_ledgers_answer() -> None:
    answer = ledger_pb2.LedgerAccount(balance=100, available_balance=70, status=ledger_pb2.LedgerAccount.FROZEN)
    assert clients.ledger_state(answer) == clients.LedgerState(balance=100, available_balance=70, status="FROZEN")


async def test_a_pending_hold_lowers_the_payers_available_balance_on_every_read_and_blocks_closing(
        accounts: FakeAccounts, ledger_client: FakeLedgerClient, customers: FakeCustomers, ledger: FakeLedger,
        alice: Caller) -> None:
    opened = await service.create_account(accounts, ledger_client, customers, alice, "USD")
    assert (opened.balance, opened.available_balance) == (0, 0)
    bob = Caller(str(uuid.uuid4()), Role.CUSTOMER, "s-bob")
    customers.verified.add(bob.subject)
    payee = str((await service.create_account(accounts, ledger_client, customers, bob, "USD")).account.account_id)
    account_id = str(opened.account.account_id)
    await ledger_service.create_deposit(ledger, TELLER, request_id="d", account_id=account_id, amount=100,
                                        currency="USD", description="")
    hold = await ledger_service.create_transfer(ledger, alice, request_id="h", from_account_id=account_id,
                                                to_account_id=payee, amount=30, currency="USD", description="",
                                                hold_seconds=60)

    def money(view: service.AccountView) -> tuple[int, int]:
        return view.balance, view.available_balance

    assert money(await service.get_account(accounts, ledger_client, alice, account_id)) == (100, 70)
    [listed], _ = await service.list_accounts(accounts, ledger_client, alice, 10, "")
    assert money(listed) == (100, 70)
    assert money(await service.freeze_account(accounts, ledger_client, TELLER, account_id, frozen=True)) == (100, 70)
    assert money(await service.freeze_account(accounts, ledger_client, TELLER, account_id, frozen=False)) == (100, 70)
    # An incoming hold counts for nothing until it is posted.
    assert money(await service.get_account(accounts, ledger_client, bob, payee)) == (0, 0)
    # The ledger's refusal, passed on unchanged, says why: the hold, not only the balance.
    await ledger_service.create_withdrawal(ledger, TELLER, request_id="w", account_id=account_id, amount=70,
                                           currency="USD", description="")
    full = await refusal(service.close_account(accounts, ledger_client, alice, account_id))
    assert (full.code, full.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_NOT_EMPTY")
    assert "hold" in full.message
    # The payee's side of a pending hold cannot close either.
    assert (await refusal(service.close_account(accounts, ledger_client, bob, payee))).reason == "ACCOUNT_NOT_EMPTY"
    await ledger_service.post_transfer(ledger, bob, transfer_id=hold.transfer_id, request_id="p", amount=20)
    assert money(await service.get_account(accounts, ledger_client, alice, account_id)) == (10, 10)
    assert money(await service.get_account(accounts, ledger_client, bob, payee)) == (20, 20)

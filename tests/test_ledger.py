"""LedgerService, the internal API svc_account uses: opening ledger accounts (idempotent),
changing their status (closing needs a zero balance, checked under the row lock; CLOSED is
final), reading balances in batches; and that only the bank's services may call it."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
from bank.transfer.v1 import ledger_pb2

from common.errors import reason_of
from tests.ledger_support import Account, Bank, refused

LedgerAccount = ledger_pb2.LedgerAccount


def open_request(account_id: str, customer_id: str, currency: str = "USD") -> ledger_pb2.OpenLedgerAccountRequest:
    return ledger_pb2.OpenLedgerAccountRequest(account_id=account_id, customer_id=customer_id, currency=currency)


async def test_open_ledger_account_is_active_empty_and_idempotent(bank: Bank) -> None:
    account_id, customer_id = str(uuid.uuid4()), str(uuid.uuid4())
    opened = await bank.ledger.OpenLedgerAccount(open_request(account_id, customer_id, "JPY"), metadata=bank.service)
    assert (opened.account_id, opened.customer_id, opened.currency, opened.status, opened.balance) \
        == (account_id, customer_id, "JPY", LedgerAccount.ACTIVE, 0)
    again = await bank.ledger.OpenLedgerAccount(open_request(account_id, customer_id, "JPY"), metadata=bank.service)
    assert again == opened
    # Concurrent opens of one new id (svc_account retrying after a timeout) agree on one account.
    racing_id = str(uuid.uuid4())
    results = await asyncio.gather(*(bank.ledger.OpenLedgerAccount(open_request(racing_id, customer_id),
                                                                   metadata=bank.service) for _ in range(8)))
    assert len({r.SerializeToString() for r in results}) == 1


async def test_open_ledger_account_refuses_conflicts_and_bad_input(bank: Bank) -> None:
    account_id, customer_id = str(uuid.uuid4()), str(uuid.uuid4())
    await bank.ledger.OpenLedgerAccount(open_request(account_id, customer_id), metadata=bank.service)
    exists = (grpc.StatusCode.ALREADY_EXISTS, "ACCOUNT_ALREADY_EXISTS")
    assert await refused(bank.ledger.OpenLedgerAccount(open_request(account_id, str(uuid.uuid4())),
                                                       metadata=bank.service)) == exists
    assert await refused(bank.ledger.OpenLedgerAccount(open_request(account_id, customer_id, "EUR"),
                                                       metadata=bank.service)) == exists
    for currency in ("XXX", "usd", ""):
        assert await refused(bank.ledger.OpenLedgerAccount(open_request(str(uuid.uuid4()), customer_id, currency),
                                                           metadata=bank.service)) \
            == (grpc.StatusCode.INVALID_ARGUMENT, "UNSUPPORTED_CURRENCY")
    for bad in (open_request("a", customer_id), open_request(str(uuid.uuid4()), "c")):
        assert await refused(bank.ledger.OpenLedgerAccount(bad, metadata=bank.service)) \
            == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


async def test_status_changes_and_closed_is_final(bank: Bank) -> None:
    account = await bank.open_account()
    assert (await bank.set_status(account, LedgerAccount.FROZEN)).status == LedgerAccount.FROZEN
    assert (await bank.set_status(account, LedgerAccount.FROZEN)).status == LedgerAccount.FROZEN  # no-op
    assert (await bank.set_status(account, LedgerAccount.ACTIVE)).status == LedgerAccount.ACTIVE
    assert (await bank.set_status(account, LedgerAccount.CLOSED)).status == LedgerAccount.CLOSED
    assert (await bank.set_status(account, LedgerAccount.CLOSED)).status == LedgerAccount.CLOSED  # no-op
    for status in (LedgerAccount.ACTIVE, LedgerAccount.FROZEN):
        assert await refused(bank.set_status(account, status)) \
            == (grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_INACTIVE")
    assert await refused(bank.set_status(account, LedgerAccount.STATUS_UNSPECIFIED)) \
        == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert await refused(bank.set_status(account, 42)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    for ghost in (str(uuid.uuid4()), "nope"):
        assert await refused(bank.set_status(Account(ghost, "", "USD"), LedgerAccount.FROZEN)) \
            == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")


async def test_closing_needs_a_zero_balance(bank: Bank) -> None:
    account = await bank.open_account()
    await bank.deposit(account, 10)
    assert await refused(bank.set_status(account, LedgerAccount.CLOSED)) \
        == (grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_NOT_EMPTY")
    await bank.withdraw(account, 10)
    assert (await bank.set_status(account, LedgerAccount.CLOSED)).status == LedgerAccount.CLOSED


async def test_a_close_racing_deposits_never_leaves_money_in_a_closed_account(bank: Bank) -> None:
    """The zero-balance check and the close happen under the row lock movements take: either the
    close wins (later deposits are ACCOUNT_INACTIVE) or a deposit does (the close is ACCOUNT_NOT_EMPTY)."""
    for _ in range(10):
        account = await bank.open_account()
        outcomes = await asyncio.gather(bank.set_status(account, LedgerAccount.CLOSED),
                                        *(bank.deposit(account, 1) for _ in range(4)), return_exceptions=True)
        final = await _get(bank, account)
        closed = not isinstance(outcomes[0], BaseException)
        deposited = sum(1 for o in outcomes[1:] if not isinstance(o, BaseException))
        assert final.balance == deposited
        if closed:
            assert final.status == LedgerAccount.CLOSED and final.balance == 0
        else:
            assert isinstance(outcomes[0], grpc.aio.AioRpcError) and reason_of(outcomes[0]) == "ACCOUNT_NOT_EMPTY"
        for failure in (o for o in outcomes[1:] if isinstance(o, BaseException)):
            assert isinstance(failure, grpc.aio.AioRpcError) and reason_of(failure) == "ACCOUNT_INACTIVE"


async def _get(bank: Bank, account: Account) -> ledger_pb2.LedgerAccount:
    reply = await bank.ledger.BatchGetLedgerAccounts(
        ledger_pb2.BatchGetLedgerAccountsRequest(account_ids=[account.account_id]), metadata=bank.service)
    found: ledger_pb2.LedgerAccount = reply.ledger_accounts[0]
    return found


async def test_batch_get_returns_accounts_in_request_order_all_or_nothing(bank: Bank) -> None:
    accounts = [await bank.open_account(currency) for currency in ("USD", "EUR", "GBP")]
    await bank.deposit(accounts[1], 77)
    ids = [accounts[2].account_id, accounts[0].account_id, accounts[1].account_id, accounts[2].account_id]
    reply = await bank.ledger.BatchGetLedgerAccounts(ledger_pb2.BatchGetLedgerAccountsRequest(account_ids=ids),
                                                     metadata=bank.service)
    assert [a.account_id for a in reply.ledger_accounts] == ids
    assert [a.balance for a in reply.ledger_accounts] == [0, 0, 77, 0]
    assert reply.ledger_accounts[0].customer_id == accounts[2].customer_id

    def batch(account_ids: list[str]) -> Any:
        return bank.ledger.BatchGetLedgerAccounts(ledger_pb2.BatchGetLedgerAccountsRequest(account_ids=account_ids),
                                                  metadata=bank.service)
    assert await refused(batch([*ids, str(uuid.uuid4())])) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    assert await refused(batch([*ids, "x"])) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    assert await refused(batch([])) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert await refused(batch([ids[0]] * 501)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert len((await batch([ids[0]] * 500)).ledger_accounts) == 500


async def test_the_ledger_is_for_the_banks_services_only(bank: Bank) -> None:
    account = await bank.open_account()
    request = ledger_pb2.BatchGetLedgerAccountsRequest(account_ids=[account.account_id])
    for metadata in (None, bank.teller, bank.customer(account.customer_id), [("x-bank-service-token", "guess")]):
        assert (await refused(bank.ledger.BatchGetLedgerAccounts(request, metadata=metadata)))[0] \
            == grpc.StatusCode.PERMISSION_DENIED

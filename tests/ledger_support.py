"""What the ledger's tests share: a client of TransferService and LedgerService that mints real
tokens (Bank; the `bank` fixture of tests/conftest.py is one on svc_transfer's port), the status
and ErrorInfo reason of a refused call, and read-only SQL for the invariants that no API
exposes (entries, outbox)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import grpc
import psycopg
import pytest
from bank.transfer.v1 import ledger_pb2, ledger_pb2_grpc, transfer_pb2, transfer_pb2_grpc

from common.config import Settings
from common.errors import reason_of
from tests.tokens import test_tokens

Metadata = list[tuple[str, str]]
TIMEOUT_S = 10.0


def new_request_id() -> str:
    return f"r-{uuid.uuid4().hex}"


async def refused(call: Any) -> tuple[grpc.StatusCode, str | None]:
    """The status code and reason of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), reason_of(caught.value)


@dataclass(frozen=True)
class Account:
    account_id: str
    customer_id: str
    currency: str


class Bank:
    """TransferService and LedgerService over one grpc.aio channel, with real tokens."""

    def __init__(self, settings: Settings, channel: grpc.aio.Channel, ledger_channel: grpc.aio.Channel | None = None) -> None:
        self._tokens = test_tokens(settings)
        self.transfers = transfer_pb2_grpc.TransferServiceStub(channel)
        self.ledger = ledger_pb2_grpc.LedgerServiceStub(ledger_channel or channel)
        self.service = self._tokens.service_metadata("tests")
        self.teller = self.bearer(self._tokens.teller())
        self._customers: dict[str, Metadata] = {}

    @staticmethod
    def bearer(token: str) -> Metadata:
        return [("authorization", f"Bearer {token}")]

    def customer(self, customer_id: str) -> Metadata:
        if customer_id not in self._customers:
            self._customers[customer_id] = self.bearer(self._tokens.customer(customer_id))
        return self._customers[customer_id]

    def token_of(self, customer_id: str) -> str:
        return self.customer(customer_id)[0][1].removeprefix("Bearer ")

    async def open_account(self, currency: str = "USD", customer_id: str | None = None) -> Account:
        account = Account(str(uuid.uuid4()), customer_id or str(uuid.uuid4()), currency)
        await self.ledger.OpenLedgerAccount(
            ledger_pb2.OpenLedgerAccountRequest(account_id=account.account_id, customer_id=account.customer_id,
                                                currency=currency),
            metadata=self.service, timeout=TIMEOUT_S)
        return account

    async def deposit(self, account: Account, amount: int, request_id: str | None = None,
                      currency: str | None = None) -> transfer_pb2.Transfer:
        return await self.transfers.CreateDeposit(  # type: ignore[no-any-return]
            transfer_pb2.CreateDepositRequest(request_id=new_request_id() if request_id is None else request_id,
                                              account_id=account.account_id, amount=amount,
                                              currency=currency or account.currency),
            metadata=self.teller, timeout=TIMEOUT_S)

    async def withdraw(self, account: Account, amount: int, request_id: str | None = None) -> transfer_pb2.Transfer:
        return await self.transfers.CreateWithdrawal(  # type: ignore[no-any-return]
            transfer_pb2.CreateWithdrawalRequest(request_id=new_request_id() if request_id is None else request_id,
                                                 account_id=account.account_id, amount=amount,
                                                 currency=account.currency),
            metadata=self.teller, timeout=TIMEOUT_S)

    async def transfer(self, source: Account, target: Account, amount: int, request_id: str | None = None,
                       currency: str | None = None, description: str = "",
                       caller: str | None = None) -> transfer_pb2.Transfer:
        return await self.transfers.CreateTransfer(  # type: ignore[no-any-return]
            transfer_pb2.CreateTransferRequest(request_id=new_request_id() if request_id is None else request_id,
                                               from_account_id=source.account_id, to_account_id=target.account_id,
                                               amount=amount, currency=currency or source.currency,
                                               description=description),
            metadata=self.customer(caller or source.customer_id), timeout=TIMEOUT_S)

    async def set_status(self, account: Account, status: int) -> ledger_pb2.LedgerAccount:
        status_value = ledger_pb2.LedgerAccount.Status.ValueType(status)  # tests also send unknown numbers
        return await self.ledger.SetLedgerAccountStatus(  # type: ignore[no-any-return]
            ledger_pb2.SetLedgerAccountStatusRequest(account_id=account.account_id, status=status_value),
            metadata=self.service, timeout=TIMEOUT_S)

    async def balances(self, *accounts: Account) -> list[int]:
        reply = await self.ledger.BatchGetLedgerAccounts(
            ledger_pb2.BatchGetLedgerAccountsRequest(account_ids=[a.account_id for a in accounts]),
            metadata=self.service, timeout=TIMEOUT_S)
        return [a.balance for a in reply.ledger_accounts]


def sql(settings: Settings, query: str, params: Any = ()) -> list[tuple[Any, ...]]:
    """Read-only look into svc_transfer's schema, for invariants no RPC shows."""
    with psycopg.connect(settings.pg_conninfo, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()  # type: ignore[arg-type]

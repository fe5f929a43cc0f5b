"""What the ledger's tests share: a client of TransferService and LedgerService that mints real
tokens (Bank, holds included; the `bank` and `banks` fixtures of tests/conftest.py are on
svc_transfer's port), the status and ErrorInfo reason of a refused call, and read-only SQL for
what no API exposes (transfer rows, deadlocks, the invariants of holds: holds_invariants), and
age_holds, time passing for holds."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

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

    async def hold(self, source: Account, target: Account, amount: int, *, hold_seconds: int = 3600,
                   request_id: str | None = None) -> transfer_pb2.Transfer:
        """A hold the payer places: a transfer described "deposit", with hold_seconds."""
        return await self.transfers.CreateTransfer(  # type: ignore[no-any-return]
            transfer_pb2.CreateTransferRequest(request_id=request_id or new_request_id(),
                                               from_account_id=source.account_id, to_account_id=target.account_id,
                                               amount=amount, currency=source.currency, description="deposit",
                                               hold_seconds=hold_seconds),
            metadata=self.customer(source.customer_id), timeout=TIMEOUT_S)

    async def post(self, hold_id: str, caller: Metadata, amount: int | None = None,
                   request_id: str | None = None) -> transfer_pb2.Transfer:
        """The hold posted, all of it or `amount`."""
        request = transfer_pb2.PostTransferRequest(transfer_id=hold_id, request_id=request_id or new_request_id())
        if amount is not None:
            request.amount = amount
        return await self.transfers.PostTransfer(request, metadata=caller, timeout=TIMEOUT_S)  # type: ignore[no-any-return]

    async def void(self, hold_id: str, caller: Metadata, request_id: str | None = None) -> transfer_pb2.Transfer:
        return await self.transfers.VoidTransfer(  # type: ignore[no-any-return]
            transfer_pb2.VoidTransferRequest(transfer_id=hold_id, request_id=request_id or new_request_id()),
            metadata=caller, timeout=TIMEOUT_S)

    async def status_of(self, transfer_id: str) -> int:
        """The transfer's status, as GetTransfer answers a teller."""
        found = await self.transfers.GetTransfer(transfer_pb2.GetTransferRequest(transfer_id=transfer_id),
                                                 metadata=self.teller, timeout=TIMEOUT_S)
        return found.status  # type: ignore[no-any-return]

    async def ledger_accounts(self, *accounts: Account) -> list[ledger_pb2.LedgerAccount]:
        """The accounts as the ledger answers them (BatchGetLedgerAccounts), in the order given."""
        reply = await self.ledger.BatchGetLedgerAccounts(
            ledger_pb2.BatchGetLedgerAccountsRequest(account_ids=[a.account_id for a in accounts]),
            metadata=self.service, timeout=TIMEOUT_S)
        return list(reply.ledger_accounts)

    async def balances(self, *accounts: Account) -> list[int]:
        return [a.balance for a in await self.ledger_accounts(*accounts)]

    async def available(self, *accounts: Account) -> list[tuple[int, int]]:
        """(balance, available_balance) of each account: available is the balance less the
        account's PENDING holds as payer (API.md, "Holds")."""
        return [(a.balance, a.available_balance) for a in await self.ledger_accounts(*accounts)]


def sql(settings: Settings, query: str, params: Any = ()) -> list[tuple[Any, ...]]:
    """Read-only look into svc_transfer's schema, for invariants no RPC shows."""
    with psycopg.connect(settings.pg_conninfo, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()  # type: ignore[arg-type]


class TransferRow(NamedTuple):
    status: str  # "PENDING", "COMPLETED", "VOIDED", "EXPIRED", ...
    amount: int
    held_amount: int | None  # None: not a hold
    from_account_id: str | None
    to_account_id: str | None


def transfer_rows(settings: Settings, transfer_ids: Sequence[str]) -> dict[str, TransferRow]:
    """The rows of these transfers, by id: a hold's status as the ledger or its release worker
    left it, read without a token (and on the leader, in the HA mode)."""
    rows = sql(settings, "SELECT transfer_id::text, status, amount, held_amount, from_account_id::text,"
                         " to_account_id::text FROM transfer.transfers WHERE transfer_id = ANY(%s::uuid[])",
               (list(transfer_ids),))
    return {str(row[0]): TransferRow(*row[1:]) for row in rows}


def deadlocks(settings: Settings) -> int:
    """How many deadlocks Postgres has detected in the database since its statistics began."""
    [(count,)] = sql(settings, "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
    return int(count)


def age_holds(settings: Settings, transfer_ids: Sequence[str], seconds: float) -> int:
    """Time passing for these PENDING holds: their expire_time moves `seconds` earlier (no money
    moves; hold_shape does not tie expire_time to create_time). This module's one write: the
    protos keep holds at 60 s at least, and waiting is slow. Returns how many holds it moved."""
    with psycopg.connect(settings.pg_conninfo, autocommit=True) as conn:
        cursor = conn.execute(
            "UPDATE transfer.transfers SET expire_time = expire_time - make_interval(secs => %s)"
            " WHERE status = 'PENDING' AND transfer_id = ANY(%s::uuid[])",
            (seconds, list(transfer_ids)))
        return cursor.rowcount


def holds_invariants(settings: Settings, account_ids: Sequence[str] | None = None) -> None:
    """Asserts the ledger's invariants with holds (docs/design/holds.md, section 6), on the accounts
    named and the holds touching them (every account and hold when None); read-only, one snapshot:
    per currency the balances sum to zero (cash included); pending_debits and pending_credits are
    the sums of the account's PENDING holds as payer and as payee; a COMPLETED hold has two entries
    summing to zero, moving its amount, at most the held amount, any other hold none; no customer
    account has balance - pending_debits below zero."""
    ids = None if account_ids is None else list(account_ids)
    with psycopg.connect(settings.pg_conninfo, autocommit=True) as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        unbalanced = conn.execute(
            "SELECT currency, sum(balance) FROM transfer.ledger_accounts GROUP BY currency"
            " HAVING sum(balance) <> 0").fetchall()
        assert not unbalanced, f"balances do not sum to zero: {unbalanced}"
        pending = conn.execute(
            "SELECT a.account_id::text, a.pending_debits, a.pending_credits, coalesce(d.held, 0), coalesce(c.held, 0)"
            " FROM transfer.ledger_accounts a"
            " LEFT JOIN (SELECT from_account_id AS id, sum(held_amount) AS held FROM transfer.transfers"
            "             WHERE status = 'PENDING' GROUP BY 1) AS d ON d.id = a.account_id"
            " LEFT JOIN (SELECT to_account_id AS id, sum(held_amount) AS held FROM transfer.transfers"
            "             WHERE status = 'PENDING' GROUP BY 1) AS c ON c.id = a.account_id"
            " WHERE (%(ids)s::uuid[] IS NULL OR a.account_id = ANY(%(ids)s::uuid[]))"
            "   AND (a.pending_debits, a.pending_credits) IS DISTINCT FROM (coalesce(d.held, 0), coalesce(c.held, 0))",
            {"ids": ids}).fetchall()
        assert not pending, f"(account, pending_debits, pending_credits, PENDING held as payer, as payee): {pending}"
        # The holds of these accounts through the two partial indexes (an OR of both sides, or an
        # "ids IS NULL" escape, makes Postgres read every hold of the ledger instead).
        holds_of = ("SELECT transfer_id FROM transfer.transfers WHERE held_amount IS NOT NULL"
                    if ids is None else
                    "SELECT transfer_id FROM transfer.transfers WHERE held_amount IS NOT NULL"
                    " AND from_account_id = ANY(%(ids)s::uuid[])"
                    " UNION SELECT transfer_id FROM transfer.transfers WHERE held_amount IS NOT NULL"
                    " AND to_account_id = ANY(%(ids)s::uuid[])")
        holds = conn.execute(
            "SELECT t.transfer_id::text, t.status, t.amount, t.held_amount, count(e.amount), sum(e.amount),"
            "       max(abs(e.amount))"
            " FROM transfer.transfers t LEFT JOIN transfer.entries e ON e.transfer_id = t.transfer_id"
            " WHERE t.transfer_id IN (" + holds_of + ")"
            " GROUP BY t.transfer_id"
            " HAVING NOT coalesce(CASE WHEN t.status = 'COMPLETED'"
            "     THEN count(e.amount) = 2 AND sum(e.amount) = 0 AND max(abs(e.amount)) = t.amount"
            "          AND t.amount <= t.held_amount"
            "     ELSE count(e.amount) = 0 AND t.amount = t.held_amount END, false)",
            {"ids": ids}).fetchall()
        assert not holds, f"(hold, status, amount, held, entries, their sum, largest): {holds}"
        overdrawn = conn.execute(
            "SELECT account_id::text, balance, pending_debits FROM transfer.ledger_accounts"
            " WHERE kind = 'CUSTOMER' AND balance - pending_debits < 0"
            "   AND (%(ids)s::uuid[] IS NULL OR account_id = ANY(%(ids)s::uuid[]))",
            {"ids": ids}).fetchall()
        assert not overdrawn, f"available balance below zero: {overdrawn}"

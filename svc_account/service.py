"""svc_account's use cases. Balances and the status that movements obey live in the ledger of
svc_transfer; svc_account keeps who owns which account and asks the ledger (internal gRPC) to
open accounts, change their status and read balances. Opening the ledger account first means
a transfer never needs a call to svc_account."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import grpc
from bank.customer.v1 import customer_internal_pb2, customer_internal_pb2_grpc
from bank.transfer.v1 import ledger_pb2, ledger_pb2_grpc
from psycopg_pool import AsyncConnectionPool

from common import auth, pagination
from common.clients import InternalChannel, call
from common.errors import DomainError
from common.ids import parse_uuid, uuid7
from svc_account import store

SUPPORTED_CURRENCIES = frozenset({"USD", "EUR", "GBP", "JPY"})
STATUS_NAMES = {ledger_pb2.LedgerAccount.ACTIVE: "ACTIVE", ledger_pb2.LedgerAccount.FROZEN: "FROZEN",
                ledger_pb2.LedgerAccount.CLOSED: "CLOSED"}


@dataclass(frozen=True)
class AccountView:
    account: store.Account
    balance: int
    status: str


def _not_found() -> DomainError:
    return DomainError(grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND", "no such account")


class AccountUseCases:
    def __init__(self, pool: AsyncConnectionPool, ledger: InternalChannel, customers: InternalChannel) -> None:
        self._pool = pool
        self._ledger_channel = ledger
        self._ledger = ledger_pb2_grpc.LedgerServiceStub(ledger.channel)
        self._customers_channel = customers
        self._customers = customer_internal_pb2_grpc.CustomerInternalServiceStub(customers.channel)

    async def create_account(self, caller: auth.Caller, currency: str) -> AccountView:
        if caller.customer_id is None:
            raise DomainError(grpc.StatusCode.PERMISSION_DENIED, "CUSTOMER_ONLY", "only customers open accounts")
        currency = currency.strip().upper()
        if currency not in SUPPORTED_CURRENCIES:
            raise DomainError(grpc.StatusCode.INVALID_ARGUMENT, "UNSUPPORTED_CURRENCY",
                              f"currency must be one of {', '.join(sorted(SUPPORTED_CURRENCIES))}",
                              field_violations=[("currency", "unsupported ISO 4217 code")])
        profile = await call(self._customers.GetCustomerProfile(
            customer_internal_pb2.GetCustomerProfileRequest(customer_id=caller.customer_id),
            metadata=self._customers_channel.metadata(), timeout=3))
        if not profile.email_verified:
            raise DomainError(grpc.StatusCode.FAILED_PRECONDITION, "EMAIL_NOT_VERIFIED",
                              "verify your email before opening an account")
        account_id = uuid7()
        # The ledger first: if the local insert then fails, an empty ledger account nobody can
        # see is left behind, which is harmless; the other order could show an account the
        # ledger does not know.
        await call(self._ledger.OpenLedgerAccount(
            ledger_pb2.OpenLedgerAccountRequest(account_id=str(account_id), customer_id=caller.customer_id,
                                                currency=currency),
            metadata=self._ledger_channel.metadata(), timeout=3))
        async with self._pool.connection() as conn:
            account = await store.insert_account(conn, account_id, UUID(caller.customer_id), currency)
        return AccountView(account, 0, "ACTIVE")

    async def _owned(self, caller: auth.Caller, account_id: str) -> store.Account:
        aid = parse_uuid(account_id)
        async with self._pool.connection() as conn:
            account = await store.get_account(conn, aid) if aid else None
        # Another customer's account is not found, exactly as a missing one.
        if account is None or not (caller.is_teller or str(account.customer_id) == caller.customer_id):
            raise _not_found()
        return account

    async def _with_ledger(self, accounts: list[store.Account]) -> list[AccountView]:
        if not accounts:
            return []
        reply = await call(self._ledger.BatchGetLedgerAccounts(
            ledger_pb2.BatchGetLedgerAccountsRequest(account_ids=[str(a.account_id) for a in accounts]),
            metadata=self._ledger_channel.metadata(), timeout=3))
        by_id = {entry.account_id: entry for entry in reply.ledger_accounts}
        views = []
        for account in accounts:
            entry = by_id.get(str(account.account_id))
            if entry is None:  # the ledger is the source of truth; a local row without it is a bug
                raise RuntimeError(f"account {account.account_id} has no ledger account")
            views.append(AccountView(account, entry.balance, STATUS_NAMES[entry.status]))
        return views

    async def get_account(self, caller: auth.Caller, account_id: str) -> AccountView:
        return (await self._with_ledger([await self._owned(caller, account_id)]))[0]

    async def list_accounts(self, caller: auth.Caller, page_size: int, page_token: str) -> tuple[list[AccountView], str]:
        size = pagination.page_size(page_size)
        key = pagination.decode_token(page_token, 2)
        if caller.customer_id is None:
            return [], ""  # a teller owns no accounts
        after = None
        if key is not None:
            try:
                after = (datetime.fromisoformat(key[0]), UUID(key[1]))
            except (TypeError, ValueError) as exc:
                raise pagination.invalid_token() from exc
        async with self._pool.connection() as conn:
            rows = await store.list_accounts(conn, UUID(caller.customer_id), after, size + 1)
        page, more = rows[:size], len(rows) > size
        token = pagination.encode_token([page[-1].create_time.isoformat(), str(page[-1].account_id)]) if more else ""
        return await self._with_ledger(page), token

    async def _set_status(self, account: store.Account, status: int) -> AccountView:
        reply = await call(self._ledger.SetLedgerAccountStatus(
            ledger_pb2.SetLedgerAccountStatusRequest(account_id=str(account.account_id), status=status),  # type: ignore[arg-type]
            metadata=self._ledger_channel.metadata(), timeout=3))
        async with self._pool.connection() as conn:
            await store.set_status(conn, account.account_id, STATUS_NAMES[reply.status])
        return AccountView(account, reply.balance, STATUS_NAMES[reply.status])

    async def close_account(self, caller: auth.Caller, account_id: str) -> AccountView:
        account = await self._owned(caller, account_id)
        if caller.customer_id is None:
            raise _not_found()  # closing is the owner's act
        return await self._set_status(account, ledger_pb2.LedgerAccount.CLOSED)

    async def freeze_account(self, caller: auth.Caller, account_id: str, frozen: bool) -> AccountView:
        account = await self._owned(caller, account_id)
        return await self._set_status(account, ledger_pb2.LedgerAccount.FROZEN if frozen else ledger_pb2.LedgerAccount.ACTIVE)

"""svc_account's adapters for the services it calls (internal gRPC, never through Envoy): the
ledger (svc_transfer's LedgerService) and the customers (svc_customer's internal service).
They speak gRPC so that the use cases do not: plain values in and out, every call with the
service token, the request id and INTERNAL_TIMEOUT_S; a refusal of the other service comes back
as a DomainError with its reason (common/clients.call)."""

from __future__ import annotations

from dataclasses import dataclass

from bank.customer.v1 import customer_internal_pb2, customer_internal_pb2_grpc
from bank.transfer.v1 import ledger_pb2, ledger_pb2_grpc

from common.clients import INTERNAL_TIMEOUT_S, InternalChannel, call

STATUS_NAMES = {ledger_pb2.LedgerAccount.ACTIVE: "ACTIVE", ledger_pb2.LedgerAccount.FROZEN: "FROZEN",
                ledger_pb2.LedgerAccount.CLOSED: "CLOSED"}
STATUSES = {name: number for number, name in STATUS_NAMES.items()}


@dataclass(frozen=True)
class LedgerState:
    """What the ledger, the source of truth, says of an account."""
    balance: int
    available_balance: int  # balance minus the account's PENDING holds as payer
    status: str  # ACTIVE, FROZEN, CLOSED


def ledger_state(account: ledger_pb2.LedgerAccount) -> LedgerState:
    """The one reading of a LedgerAccount, whichever RPC answered it."""
    return LedgerState(balance=account.balance, available_balance=account.available_balance,
                       status=STATUS_NAMES[account.status])


class LedgerClient:
    def __init__(self, channel: InternalChannel) -> None:
        self._channel = channel
        self._stub = ledger_pb2_grpc.LedgerServiceStub(channel.channel)

    async def open_account(self, account_id: str, customer_id: str, currency: str) -> None:
        await call(self._stub.OpenLedgerAccount(
            ledger_pb2.OpenLedgerAccountRequest(account_id=account_id, customer_id=customer_id, currency=currency),
            metadata=self._channel.metadata(), timeout=INTERNAL_TIMEOUT_S))

    async def set_status(self, account_id: str, status: str) -> LedgerState:
        reply = await call(self._stub.SetLedgerAccountStatus(
            ledger_pb2.SetLedgerAccountStatusRequest(account_id=account_id, status=STATUSES[status]),  # type: ignore[arg-type]
            metadata=self._channel.metadata(), timeout=INTERNAL_TIMEOUT_S))
        return ledger_state(reply)

    async def states(self, account_ids: list[str]) -> dict[str, LedgerState]:
        """The accounts the ledger knows among account_ids (all or none: a missing one refuses)."""
        reply = await call(self._stub.BatchGetLedgerAccounts(
            ledger_pb2.BatchGetLedgerAccountsRequest(account_ids=account_ids),
            metadata=self._channel.metadata(), timeout=INTERNAL_TIMEOUT_S))
        return {entry.account_id: ledger_state(entry) for entry in reply.ledger_accounts}


class CustomerClient:
    def __init__(self, channel: InternalChannel) -> None:
        self._channel = channel
        self._stub = customer_internal_pb2_grpc.CustomerInternalServiceStub(channel.channel)

    async def email_verified(self, customer_id: str) -> bool:
        profile = await call(self._stub.GetCustomerProfile(
            customer_internal_pb2.GetCustomerProfileRequest(customer_id=customer_id),
            metadata=self._channel.metadata(), timeout=INTERNAL_TIMEOUT_S))
        return bool(profile.email_verified)

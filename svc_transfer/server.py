"""svc_transfer's gRPC entrypoint: TransferService (public, routed by Envoy) and LedgerService
(internal: svc_account opens ledger accounts, changes their status and reads balances through it).

Thin: each handler turns a request into a call of service.py and its result into a message;
domain errors become statuses in the interceptor. Access levels are declared in SPEC below and
enforced by the interceptor before a handler runs.
"""

from __future__ import annotations

from pathlib import Path

import grpc
from bank.transfer.v1 import ledger_pb2, ledger_pb2_grpc, transfer_pb2, transfer_pb2_grpc

from common import auth, server
from common.auth import Access
from common.grpcutil import service_name
from common.grpcutil import timestamp as _timestamp
from common.outbox import OutboxNudge, OutboxRelay
from svc_transfer import events, service
from svc_transfer.batching import MovementBatcher
from svc_transfer.release import HoldReleaser
from svc_transfer.store import LedgerAccount, LedgerStore, Transfer

_TRANSFER_SERVICE = "/bank.transfer.v1.TransferService/"
_LEDGER_SERVICE = "/bank.transfer.v1.LedgerService/"
ACCESS = {
    f"{_TRANSFER_SERVICE}CreateDeposit": Access.TELLER,
    f"{_TRANSFER_SERVICE}CreateWithdrawal": Access.TELLER,
    _LEDGER_SERVICE: Access.INTERNAL,  # every LedgerService method: other services only
}


def transfer_message(transfer: Transfer) -> transfer_pb2.Transfer:
    message = transfer_pb2.Transfer(
        transfer_id=transfer.transfer_id,
        request_id=transfer.request_id,
        from_account_id=transfer.from_account_id,
        to_account_id=transfer.to_account_id,
        amount=transfer.amount,
        currency=transfer.currency,
        description=transfer.description,
        status=transfer_pb2.Transfer.Status.Value(transfer.status),
        create_time=_timestamp(transfer.create_time),
        kind=transfer_pb2.Transfer.Kind.Value(transfer.kind),
    )
    if transfer.held_amount is not None:  # a hold
        assert transfer.expire_time is not None
        message.held_amount = transfer.held_amount
        message.expire_time.CopyFrom(_timestamp(transfer.expire_time))
    return message


def account_message(account: LedgerAccount) -> ledger_pb2.LedgerAccount:
    return ledger_pb2.LedgerAccount(
        account_id=account.account_id,
        customer_id=account.customer_id,
        currency=account.currency,
        status=ledger_pb2.LedgerAccount.Status.Value(account.status),
        balance=account.balance,
        create_time=_timestamp(account.create_time),
        available_balance=account.available_balance,
    )


class TransferService(transfer_pb2_grpc.TransferServiceServicer):
    def __init__(self, ledger: LedgerStore, movements: MovementBatcher, nudge: OutboxNudge) -> None:
        self._ledger = ledger
        self._movements = movements
        self._nudge = nudge

    async def CreateTransfer(self, request: transfer_pb2.CreateTransferRequest,
                             context: grpc.aio.ServicerContext) -> transfer_pb2.Transfer:
        transfer = await service.create_transfer(
            self._movements, auth.current(), request_id=request.request_id, from_account_id=request.from_account_id,
            to_account_id=request.to_account_id, amount=request.amount, currency=request.currency,
            description=request.description, on_commit=self._nudge,
            hold_seconds=request.hold_seconds if request.HasField("hold_seconds") else None)
        return transfer_message(transfer)

    async def PostTransfer(self, request: transfer_pb2.PostTransferRequest,
                           context: grpc.aio.ServicerContext) -> transfer_pb2.Transfer:
        transfer = await service.post_transfer(
            self._movements, auth.current(), transfer_id=request.transfer_id, request_id=request.request_id,
            amount=request.amount if request.HasField("amount") else None, on_commit=self._nudge)
        return transfer_message(transfer)

    async def VoidTransfer(self, request: transfer_pb2.VoidTransferRequest,
                           context: grpc.aio.ServicerContext) -> transfer_pb2.Transfer:
        transfer = await service.void_transfer(
            self._movements, auth.current(), transfer_id=request.transfer_id, request_id=request.request_id,
            on_commit=self._nudge)
        return transfer_message(transfer)

    async def GetTransfer(self, request: transfer_pb2.GetTransferRequest,
                          context: grpc.aio.ServicerContext) -> transfer_pb2.Transfer:
        return transfer_message(await service.get_transfer(self._ledger, auth.current(), request.transfer_id))

    async def ListTransfers(self, request: transfer_pb2.ListTransfersRequest,
                            context: grpc.aio.ServicerContext) -> transfer_pb2.ListTransfersResponse:
        transfers, next_page_token = await service.list_transfers(
            self._ledger, auth.current(), account_id=request.account_id, page_size=request.page_size,
            page_token=request.page_token)
        return transfer_pb2.ListTransfersResponse(transfers=[transfer_message(t) for t in transfers],
                                                  next_page_token=next_page_token)

    async def CreateDeposit(self, request: transfer_pb2.CreateDepositRequest,
                            context: grpc.aio.ServicerContext) -> transfer_pb2.Transfer:
        transfer = await service.create_deposit(
            self._movements, auth.current(), request_id=request.request_id, account_id=request.account_id,
            amount=request.amount, currency=request.currency, description=request.description,
            on_commit=self._nudge)
        return transfer_message(transfer)

    async def CreateWithdrawal(self, request: transfer_pb2.CreateWithdrawalRequest,
                               context: grpc.aio.ServicerContext) -> transfer_pb2.Transfer:
        transfer = await service.create_withdrawal(
            self._movements, auth.current(), request_id=request.request_id, account_id=request.account_id,
            amount=request.amount, currency=request.currency, description=request.description,
            on_commit=self._nudge)
        return transfer_message(transfer)


class LedgerService(ledger_pb2_grpc.LedgerServiceServicer):
    def __init__(self, ledger: LedgerStore) -> None:
        self._ledger = ledger

    async def OpenLedgerAccount(self, request: ledger_pb2.OpenLedgerAccountRequest,
                                context: grpc.aio.ServicerContext) -> ledger_pb2.LedgerAccount:
        account = await service.open_ledger_account(
            self._ledger, account_id=request.account_id, customer_id=request.customer_id, currency=request.currency)
        return account_message(account)

    async def SetLedgerAccountStatus(self, request: ledger_pb2.SetLedgerAccountStatusRequest,
                                     context: grpc.aio.ServicerContext) -> ledger_pb2.LedgerAccount:
        statuses = ledger_pb2.LedgerAccount.Status
        status = statuses.Name(request.status) if request.status in statuses.values() else ""
        account = await service.set_ledger_account_status(self._ledger, account_id=request.account_id, status=status)
        return account_message(account)

    async def BatchGetLedgerAccounts(self, request: ledger_pb2.BatchGetLedgerAccountsRequest,
                                     context: grpc.aio.ServicerContext) -> ledger_pb2.BatchGetLedgerAccountsResponse:
        accounts = await service.batch_get_ledger_accounts(self._ledger, list(request.account_ids))
        return ledger_pb2.BatchGetLedgerAccountsResponse(ledger_accounts=[account_message(a) for a in accounts])


def register(grpc_server: grpc.aio.Server, resources: server.Resources) -> list[str]:
    nudge = OutboxNudge(resources.pool, SPEC.name)
    # Movements go to Postgres in batches (group commit, batching.py); stopped after the gRPC
    # server, so the movements of in-flight RPCs are still applied during a graceful stop.
    movements = MovementBatcher(resources.pool)
    resources.workers.append(movements)
    ledger = LedgerStore(resources.pool)
    transfer_pb2_grpc.add_TransferServiceServicer_to_server(TransferService(ledger, movements, nudge), grpc_server)
    ledger_pb2_grpc.add_LedgerServiceServicer_to_server(LedgerService(ledger), grpc_server)
    # Publishes the events that movements write to transfer.outbox, building their bytes
    # from the committed rows (one active relay per schema, whatever the number of processes).
    resources.workers.append(OutboxRelay(resources.settings, resources.pool, SPEC.name, events.payloads))
    # Releases lapsed holds in every process (SKIP LOCKED lets them share the work).
    resources.workers.append(HoldReleaser(resources.pool, nudge))
    return [service_name(transfer_pb2, "TransferService"), service_name(ledger_pb2, "LedgerService")]


SPEC = server.ServiceSpec("transfer", register, Path(__file__).parent / "migrations", access=ACCESS)


def main() -> None:
    server.run(SPEC)

"""svc_account's gRPC entrypoint: AccountService (public, routed by Envoy). Thin: requests to
use cases, results to messages."""

from __future__ import annotations

from pathlib import Path

import grpc
from bank.account.v1 import account_pb2, account_pb2_grpc

from common import auth, server
from common.clients import InternalChannel
from common.grpcutil import service_name
from svc_account.service import AccountUseCases, AccountView

ACCESS = {
    "/bank.account.v1.AccountService/FreezeAccount": auth.Access.TELLER,
    "/bank.account.v1.AccountService/UnfreezeAccount": auth.Access.TELLER,
}


def _account(view: AccountView) -> account_pb2.Account:
    message = account_pb2.Account(account_id=str(view.account.account_id), customer_id=str(view.account.customer_id),
                                  currency=view.account.currency, balance=view.balance,
                                  status=account_pb2.Account.Status.Value(view.status))
    message.create_time.FromDatetime(view.account.create_time)
    return message


class AccountService(account_pb2_grpc.AccountServiceServicer):
    def __init__(self, use_cases: AccountUseCases) -> None:
        self._uc = use_cases

    async def CreateAccount(self, request: account_pb2.CreateAccountRequest,
                            context: grpc.aio.ServicerContext) -> account_pb2.Account:
        return _account(await self._uc.create_account(auth.current(), request.currency))

    async def GetAccount(self, request: account_pb2.GetAccountRequest,
                         context: grpc.aio.ServicerContext) -> account_pb2.Account:
        return _account(await self._uc.get_account(auth.current(), request.account_id))

    async def ListAccounts(self, request: account_pb2.ListAccountsRequest,
                           context: grpc.aio.ServicerContext) -> account_pb2.ListAccountsResponse:
        views, token = await self._uc.list_accounts(auth.current(), request.page_size, request.page_token)
        return account_pb2.ListAccountsResponse(accounts=[_account(v) for v in views], next_page_token=token)

    async def CloseAccount(self, request: account_pb2.CloseAccountRequest,
                           context: grpc.aio.ServicerContext) -> account_pb2.Account:
        return _account(await self._uc.close_account(auth.current(), request.account_id))

    async def FreezeAccount(self, request: account_pb2.FreezeAccountRequest,
                            context: grpc.aio.ServicerContext) -> account_pb2.Account:
        return _account(await self._uc.freeze_account(auth.current(), request.account_id, frozen=True))

    async def UnfreezeAccount(self, request: account_pb2.UnfreezeAccountRequest,
                              context: grpc.aio.ServicerContext) -> account_pb2.Account:
        return _account(await self._uc.freeze_account(auth.current(), request.account_id, frozen=False))

    # ListAccountActivity (statements from Cassandra) is not built yet: UNIMPLEMENTED.


class _Channels:
    """Closes the internal channels on shutdown."""

    def __init__(self, *channels: InternalChannel) -> None:
        self._channels = channels

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        for channel in self._channels:
            await channel.close()


def register(grpc_server: grpc.aio.Server, resources: server.Resources) -> list[str]:
    s = resources.settings
    ledger = InternalChannel(s.transfer_addr, resources.keys, "svc_account")
    customers = InternalChannel(s.customer_addr, resources.keys, "svc_account")
    resources.workers.append(_Channels(ledger, customers))
    account_pb2_grpc.add_AccountServiceServicer_to_server(AccountService(AccountUseCases(resources.pool, ledger, customers)),
                                                          grpc_server)
    return [service_name(account_pb2, "AccountService")]


def main() -> None:
    server.run(server.ServiceSpec("account", register, Path(__file__).parent / "migrations", access=ACCESS))

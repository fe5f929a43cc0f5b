"""svc_account's gRPC entrypoint: AccountService (public, routed by Envoy). Thin: requests to
use cases, results to messages."""

from __future__ import annotations

from pathlib import Path

import grpc
from bank.account.v1 import account_pb2, account_pb2_grpc
from bank.events.v1 import events_pb2
from google.protobuf.message import Message

from common import auth, server
from common.clients import InternalChannel
from common.config import Settings
from common.consumer import EventConsumer, EventMeta, Route, member_name
from common.events import TRANSFER_TOPIC
from common.grpcutil import service_name
from svc_account import service
from svc_account.clients import CustomerClient, LedgerClient
from svc_account.service import AccountView
from svc_account.store import AccountStore, Activity, ActivityStore

CONSUMER_GROUP_ID = "svc_account"

ACCESS = {
    "/bank.account.v1.AccountService/FreezeAccount": auth.Access.TELLER,
    "/bank.account.v1.AccountService/UnfreezeAccount": auth.Access.TELLER,
}


def _account(view: AccountView) -> account_pb2.Account:
    message = account_pb2.Account(account_id=str(view.account.account_id), customer_id=str(view.account.customer_id),
                                  currency=view.account.currency, balance=view.balance,
                                  available_balance=view.available_balance, status=account_pb2.Account.Status.Value(view.status))
    message.create_time.FromDatetime(view.account.create_time)
    return message


class AccountService(account_pb2_grpc.AccountServiceServicer):
    def __init__(self, accounts: AccountStore, ledger: LedgerClient, customers: CustomerClient,
                 activity: ActivityStore) -> None:
        self._accounts = accounts
        self._ledger = ledger
        self._customers = customers
        self._activity = activity

    async def CreateAccount(self, request: account_pb2.CreateAccountRequest,
                            context: grpc.aio.ServicerContext) -> account_pb2.Account:
        return _account(await service.create_account(self._accounts, self._ledger, self._customers, auth.current(),
                                                     request.currency))

    async def GetAccount(self, request: account_pb2.GetAccountRequest,
                         context: grpc.aio.ServicerContext) -> account_pb2.Account:
        return _account(await service.get_account(self._accounts, self._ledger, auth.current(), request.account_id))

    async def ListAccounts(self, request: account_pb2.ListAccountsRequest,
                           context: grpc.aio.ServicerContext) -> account_pb2.ListAccountsResponse:
        views, token = await service.list_accounts(self._accounts, self._ledger, auth.current(), request.page_size,
                                                   request.page_token)
        return account_pb2.ListAccountsResponse(accounts=[_account(v) for v in views], next_page_token=token)

    async def CloseAccount(self, request: account_pb2.CloseAccountRequest,
                           context: grpc.aio.ServicerContext) -> account_pb2.Account:
        return _account(await service.close_account(self._accounts, self._ledger, auth.current(), request.account_id))

    async def FreezeAccount(self, request: account_pb2.FreezeAccountRequest,
                            context: grpc.aio.ServicerContext) -> account_pb2.Account:
        return _account(await service.freeze_account(self._accounts, self._ledger, auth.current(), request.account_id,
                                                     frozen=True))

    async def UnfreezeAccount(self, request: account_pb2.UnfreezeAccountRequest,
                              context: grpc.aio.ServicerContext) -> account_pb2.Account:
        return _account(await service.freeze_account(self._accounts, self._ledger, auth.current(), request.account_id,
                                                     frozen=False))

    async def ListAccountActivity(self, request: account_pb2.ListAccountActivityRequest,
                                  context: grpc.aio.ServicerContext) -> account_pb2.ListAccountActivityResponse:
        lines, token = await service.list_activity(self._accounts, self._activity, auth.current(), request.account_id,
                                                   request.page_size, request.page_token)
        return account_pb2.ListAccountActivityResponse(activities=[_activity(a) for a in lines], next_page_token=token)


def _activity(a: Activity) -> account_pb2.Activity:
    message = account_pb2.Activity(
        activity_id=str(a.activity_id), transfer_id=a.transfer_id, kind=account_pb2.Activity.Kind.Value(a.kind),
        amount=a.amount, currency=a.currency, balance_after=a.balance_after,
        counterparty_account_id=a.counterparty_account_id, description=a.description)
    message.create_time.FromDatetime(a.create_time)
    return message


def _statements_consumer(settings: Settings, activity: ActivityStore) -> EventConsumer:
    """Projects bank.transfer.v1 into the statements (group "svc_account")."""
    async def money_moved(message: Message, meta: EventMeta) -> str:
        assert isinstance(message, events_pb2.MoneyMoved)
        return await service.money_moved(activity, message, meta)

    routes = {events_pb2.MoneyMoved.DESCRIPTOR.full_name: Route(events_pb2.MoneyMoved, money_moved)}
    # Statement lines are independent idempotent upserts: a batch is written all at once.
    return EventConsumer(settings, group_id=CONSUMER_GROUP_ID, topics=[TRANSFER_TOPIC], routes=routes,
                         event_worst_case_s=service.EVENT_WORST_CASE_S, ordered=False, batch_max_records=500,
                         static_member=member_name(settings, CONSUMER_GROUP_ID))


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
    activity = ActivityStore(s, resources.pool)
    # Started in this order, stopped in reverse: the consumer stops before the store closes.
    resources.workers.extend([_Channels(ledger, customers), activity, _statements_consumer(s, activity)])
    servicer = AccountService(AccountStore(resources.pool), LedgerClient(ledger), CustomerClient(customers), activity)
    account_pb2_grpc.add_AccountServiceServicer_to_server(servicer, grpc_server)
    return [service_name(account_pb2, "AccountService")]


def main() -> None:
    server.run(server.ServiceSpec("account", register, Path(__file__).parent / "migrations", access=ACCESS))

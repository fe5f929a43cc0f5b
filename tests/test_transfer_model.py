"""Property-based: Hypothesis drives random sequences of ledger operations (open, deposit,
withdraw, transfer, freeze/unfreeze/close, idempotent retries and key reuse) against the real
service and against a few lines of in-memory model; after every step the ledger's balances and
statuses must equal the model's, and every refusal must carry the reason the model predicts."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from bank.transfer.v1 import ledger_pb2, ledger_pb2_grpc, transfer_pb2, transfer_pb2_grpc
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_config
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from common.config import Settings
from common.errors import reason_of
from devstack.stack import Stack
from tests.ledger_support import TIMEOUT_S, Metadata, new_request_id
from tests.tokens import test_tokens

CURRENCIES = ("USD", "EUR")
ACCOUNT_CURRENCIES = ("USD", "USD", "USD", "USD", "USD", "EUR")
account_indexes = st.integers(0, len(ACCOUNT_CURRENCIES) - 1)


def now_and_then() -> st.SearchStrategy[bool]:
    """True about once in ten draws (Hypothesis favours the first element and small integers)."""
    return st.sampled_from([False] * 9 + [True])


def mostly(valid: st.SearchStrategy[int]) -> st.SearchStrategy[int]:
    """Mostly valid amounts; now and then zero or negative."""
    return now_and_then().flatmap(lambda odd: st.sampled_from([0, -1]) if odd else valid)


# Deposits larger than transfers, so that transfers and withdrawals usually find money to move.
deposit_amounts = mostly(st.integers(min_value=1_000, max_value=100_000))
amounts = mostly(st.integers(min_value=1, max_value=5_000))


@dataclass
class ModelAccount:
    account_id: str
    customer_id: str
    currency: str
    status: str = "ACTIVE"
    balance: int = 0


@dataclass(frozen=True)
class Sent:
    """A request that moved money, kept to be retried."""

    kind: str
    request: transfer_pb2.CreateTransferRequest | transfer_pb2.CreateDepositRequest | transfer_pb2.CreateWithdrawalRequest
    metadata: Metadata
    transfer_id: str


@dataclass
class Clients:
    transfers: transfer_pb2_grpc.TransferServiceStub
    ledger: ledger_pb2_grpc.LedgerServiceStub
    service: Metadata
    teller: Metadata
    mint_customer: Callable[[str], str]
    customer_tokens: dict[str, Metadata] = field(default_factory=dict)


class LedgerModel(RuleBasedStateMachine):
    clients: Clients  # set by the test before the machine runs

    def __init__(self) -> None:
        super().__init__()
        self.model: dict[str, ModelAccount] = {}
        self.ids: list[str] = []  # the run's accounts, by index (see ACCOUNT_CURRENCIES)
        self.sent: list[Sent] = []

    # --- helpers ---------------------------------------------------------------------------

    def customer(self, customer_id: str) -> Metadata:
        tokens = self.clients.customer_tokens
        if customer_id not in tokens:
            tokens[customer_id] = [("authorization", f"Bearer {self.clients.mint_customer(customer_id)}")]
        return tokens[customer_id]

    def call(self, kind: str, request: object, metadata: Metadata) -> tuple[transfer_pb2.Transfer | None, str | None]:
        method = {"TRANSFER": self.clients.transfers.CreateTransfer, "DEPOSIT": self.clients.transfers.CreateDeposit,
                  "WITHDRAWAL": self.clients.transfers.CreateWithdrawal}[kind]
        try:
            return method(request, metadata=metadata, timeout=TIMEOUT_S), None
        except grpc.RpcError as error:
            return None, reason_of(error)

    @staticmethod
    def movable_refusal(amount: int, currency: str, *sides: tuple[ModelAccount, bool]) -> str | None:
        """The model's verdict, in the ledger's order of checks; each side is (account, debited)."""
        if amount <= 0:
            return "INVALID_AMOUNT"
        if any(a.status != "ACTIVE" for a, _ in sides):
            return "ACCOUNT_INACTIVE"
        if any(a.currency != currency for a, _ in sides):
            return "CURRENCY_MISMATCH"
        if any(debited and a.balance < amount for a, debited in sides):
            return "INSUFFICIENT_FUNDS"
        return None

    def record(self, kind: str, request: object, metadata: Metadata, transfer: transfer_pb2.Transfer | None,
               reason: str | None, expected: str | None) -> bool:
        assert reason == expected, f"{kind}: ledger said {reason}, model says {expected}"
        if expected is None:
            assert transfer is not None
            self.sent.append(Sent(kind, request, metadata, transfer.transfer_id))  # type: ignore[arg-type]
        return expected is None

    # --- rules ---------------------------------------------------------------------------------

    def open(self, currency: str) -> str:
        account = ModelAccount(str(uuid.uuid4()), str(uuid.uuid4()), currency)
        self.clients.ledger.OpenLedgerAccount(
            ledger_pb2.OpenLedgerAccountRequest(account_id=account.account_id, customer_id=account.customer_id,
                                                currency=currency), metadata=self.clients.service, timeout=TIMEOUT_S)
        self.model[account.account_id] = account
        return account.account_id

    @initialize()
    def open_accounts(self) -> None:
        # A few accounts for the whole run, so rules meet the same ones again and again.
        self.ids = [self.open(c) for c in ACCOUNT_CURRENCIES]

    @rule(index=account_indexes, amount=deposit_amounts, other_currency=now_and_then())
    def deposit(self, index: int, amount: int, other_currency: bool) -> None:
        account_id = self.ids[index]
        account = self.model[account_id]
        currency = next(c for c in CURRENCIES if c != account.currency) if other_currency else account.currency
        request = transfer_pb2.CreateDepositRequest(request_id=new_request_id(), account_id=account_id, amount=amount,
                                                    currency=currency)
        transfer, reason = self.call("DEPOSIT", request, self.clients.teller)
        if self.record("DEPOSIT", request, self.clients.teller, transfer, reason,
                       self.movable_refusal(amount, currency, (account, False))):
            account.balance += amount

    @rule(index=account_indexes, amount=amounts)
    def withdraw(self, index: int, amount: int) -> None:
        account_id = self.ids[index]
        account = self.model[account_id]
        request = transfer_pb2.CreateWithdrawalRequest(request_id=new_request_id(), account_id=account_id,
                                                       amount=amount, currency=account.currency)
        transfer, reason = self.call("WITHDRAWAL", request, self.clients.teller)
        if self.record("WITHDRAWAL", request, self.clients.teller, transfer, reason,
                       self.movable_refusal(amount, account.currency, (account, True))):
            account.balance -= amount

    @rule(source=account_indexes, offset=st.integers(1, len(ACCOUNT_CURRENCIES) - 1), same_account=now_and_then(),
          amount=amounts, as_stranger=now_and_then(), currency_of_target=now_and_then())
    def transfer(self, source: int, offset: int, same_account: bool, amount: int, as_stranger: bool,
                 currency_of_target: bool) -> None:
        source_id = self.ids[source]
        target_id = source_id if same_account else self.ids[(source + offset) % len(self.ids)]
        from_account, to_account = self.model[source_id], self.model[target_id]
        currency = to_account.currency if currency_of_target else from_account.currency
        caller = to_account.customer_id if as_stranger else from_account.customer_id
        request = transfer_pb2.CreateTransferRequest(request_id=new_request_id(), from_account_id=source_id,
                                                     to_account_id=target_id, amount=amount, currency=currency)
        transfer, reason = self.call("TRANSFER", request, self.customer(caller))
        if amount <= 0:
            expected: str | None = "INVALID_AMOUNT"
        elif source_id == target_id:
            expected = "SAME_ACCOUNT"
        elif caller != from_account.customer_id:
            expected = "ACCOUNT_NOT_FOUND"
        else:
            expected = self.movable_refusal(amount, currency, (from_account, True), (to_account, False))
        if self.record("TRANSFER", request, self.customer(caller), transfer, reason, expected):
            from_account.balance -= amount
            to_account.balance += amount

    @rule(index=account_indexes, status=st.sampled_from(["ACTIVE", "ACTIVE", "FROZEN", "CLOSED"]))
    def set_status(self, index: int, status: str) -> None:
        account_id = self.ids[index]
        account = self.model[account_id]
        try:
            self.clients.ledger.SetLedgerAccountStatus(
                ledger_pb2.SetLedgerAccountStatusRequest(account_id=account_id,
                                                         status=ledger_pb2.LedgerAccount.Status.Value(status)),
                metadata=self.clients.service, timeout=TIMEOUT_S)
            reason = None
        except grpc.RpcError as error:
            reason = reason_of(error)
        if status == account.status:
            expected = None
        elif account.status == "CLOSED":
            expected = "ACCOUNT_INACTIVE"
        elif status == "CLOSED" and account.balance != 0:
            expected = "ACCOUNT_NOT_EMPTY"
        else:
            expected = None
        assert reason == expected
        if expected is None:
            account.status = status

    @rule(data=st.data(), change_amount=st.booleans())
    def retry(self, data: st.DataObject, change_amount: bool) -> None:
        if not self.sent:
            return
        sent = data.draw(st.sampled_from(self.sent))
        request = type(sent.request).FromString(sent.request.SerializeToString())
        if change_amount:
            request.amount += 1
        transfer, reason = self.call(sent.kind, request, sent.metadata)
        if change_amount:
            assert reason == "IDEMPOTENCY_KEY_REUSED"
        else:
            assert reason is None and transfer is not None and transfer.transfer_id == sent.transfer_id

    # --- the invariant -------------------------------------------------------------------------

    @invariant()
    def ledger_matches_model(self) -> None:
        if not self.model:
            return
        reply = self.clients.ledger.BatchGetLedgerAccounts(
            ledger_pb2.BatchGetLedgerAccountsRequest(account_ids=list(self.model)), metadata=self.clients.service,
            timeout=TIMEOUT_S)
        actual = {a.account_id: (a.balance, ledger_pb2.LedgerAccount.Status.Name(a.status)) for a in reply.ledger_accounts}
        assert actual == {a.account_id: (a.balance, a.status) for a in self.model.values()}
        assert all(a.balance >= 0 for a in self.model.values())


def test_ledger_behaves_like_the_model(stack: Stack, settings: Settings) -> None:
    tokens = test_tokens(settings)
    with grpc.insecure_channel(f"127.0.0.1:{settings.transfer_grpc_port}") as channel:
        LedgerModel.clients = Clients(
            transfer_pb2_grpc.TransferServiceStub(channel), ledger_pb2_grpc.LedgerServiceStub(channel),
            tokens.service_metadata("tests"), [("authorization", f"Bearer {tokens.teller()}")], tokens.customer)
        run_state_machine_as_test(LedgerModel, settings=hypothesis_settings)  # type: ignore[no-untyped-call]


# Bounded: about 1,500 RPCs, a few seconds. No example database: the ledger is not replayable anyway.
hypothesis_settings = hypothesis_config(max_examples=40, stateful_step_count=40, deadline=None, database=None,
                               suppress_health_check=[HealthCheck.too_slow])

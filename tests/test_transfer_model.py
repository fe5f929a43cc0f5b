"""Property-based: Hypothesis drives random sequences of ledger operations (open, deposit,
withdraw, transfer, freeze/unfreeze/close, holds placed, posted, voided and left to lapse, time
passing, idempotent retries and key reuse) against the real service and against a few lines of
in-memory model; after every step the ledger's balances, available balances, statuses and holds
must equal the model's, the holds invariants must hold, and every refusal must carry the reason
the model predicts (for holds, in the order of docs/design/holds.md 2.4)."""

from __future__ import annotations

import math
import time
import uuid
from collections import Counter
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
    precondition,
    rule,
    run_state_machine_as_test,
)

from common.config import Settings
from common.errors import reason_of
from devstack.stack import Stack
from tests import figures
from tests.ledger_support import TIMEOUT_S, Metadata, age_holds, holds_invariants, new_request_id, sql
from tests.support import until
from tests.tokens import test_tokens

CURRENCIES = ("USD", "EUR")
ACCOUNT_CURRENCIES = ("USD", "USD", "USD", "USD", "USD", "EUR")
account_indexes = st.integers(0, len(ACCOUNT_CURRENCIES) - 1)
USD_ACCOUNTS = ACCOUNT_CURRENCIES.index("EUR")  # the first ones; then the EUR account
# Who asks to post or void a hold: its payee, its payer, a teller, or a customer owning neither side.
CALLERS = ("payee", "payer", "teller", "stranger")
STRANGER_ID = str(uuid.uuid4())  # a customer who owns no account of the run
# A hold never sits this close to its expiry while real time passes (steps, the release worker's
# wait): one that would is lapsed at once, so the model never races the database's clock.
EXPIRY_MARGIN_S = 20.0

Request = (transfer_pb2.CreateTransferRequest | transfer_pb2.CreateDepositRequest | transfer_pb2.CreateWithdrawalRequest
           | transfer_pb2.PostTransferRequest | transfer_pb2.VoidTransferRequest)


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


@dataclass
class ModelHold:
    """A hold, or (held None) a completed plain transfer that post and void must find not pending."""

    transfer_id: str
    payer: ModelAccount
    payee: ModelAccount
    held: int | None
    amount: int  # the held amount, or once posted the amount moved
    expire_at: float  # time.monotonic() when the database's clock reaches expire_time
    request: transfer_pb2.CreateTransferRequest
    status: str = "PENDING"

    @property
    def remaining_s(self) -> float:
        return self.expire_at - time.monotonic()


@dataclass(frozen=True)
class Sent:
    """An accepted request, kept to be retried, and its first answer."""

    kind: str
    request: Request
    metadata: Metadata
    answer: transfer_pb2.Transfer


@dataclass
class Clients:
    settings: Settings
    transfers: transfer_pb2_grpc.TransferServiceStub
    ledger: ledger_pb2_grpc.LedgerServiceStub
    service: Metadata
    teller: Metadata
    mint_customer: Callable[[str], str]
    customer_tokens: dict[str, Metadata] = field(default_factory=dict)


@dataclass
class Run:
    """What the whole run did, printed for the issue's closing note and checked at the end."""

    examples: int = 0
    steps: int = 0
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)


class LedgerModel(RuleBasedStateMachine):
    clients: Clients  # set by the test before the machine runs
    run: Run

    def __init__(self) -> None:
        super().__init__()
        self.model: dict[str, ModelAccount] = {}
        self.ids: list[str] = []  # the run's accounts, by index (see ACCOUNT_CURRENCIES)
        self.holds: list[ModelHold] = []
        self.plain: list[ModelHold] = []  # completed customer transfers, never holds
        self.sent: list[Sent] = []

    # --- helpers ---------------------------------------------------------------------------

    def customer(self, customer_id: str) -> Metadata:
        tokens = self.clients.customer_tokens
        if customer_id not in tokens:
            tokens[customer_id] = [("authorization", f"Bearer {self.clients.mint_customer(customer_id)}")]
        return tokens[customer_id]

    def call(self, kind: str, request: object, metadata: Metadata) -> tuple[transfer_pb2.Transfer | None, str | None]:
        transfer, reason, _ = self.call_with_message(kind, request, metadata)
        return transfer, reason

    def call_with_message(self, kind: str, request: object,
                          metadata: Metadata) -> tuple[transfer_pb2.Transfer | None, str | None, str]:
        stubs = self.clients.transfers
        method = {"TRANSFER": stubs.CreateTransfer, "HOLD": stubs.CreateTransfer, "DEPOSIT": stubs.CreateDeposit,
                  "WITHDRAWAL": stubs.CreateWithdrawal, "POST": stubs.PostTransfer, "VOID": stubs.VoidTransfer}[kind]
        try:
            return method(request, metadata=metadata, timeout=TIMEOUT_S), None, ""
        except grpc.RpcError as error:
            return None, reason_of(error), error.details() or ""  # type: ignore[attr-defined]

    def available(self, account: ModelAccount) -> int:
        """The balance minus what the account's PENDING holds as payer reserve."""
        return account.balance - sum(h.amount for h in self.holds if h.status == "PENDING" and h.payer is account)

    def pending_on(self, account: ModelAccount) -> bool:
        return any(h.status == "PENDING" and account in (h.payer, h.payee) for h in self.holds)

    def movable_refusal(self, amount: int, currency: str, *sides: tuple[ModelAccount, bool]) -> str | None:
        """The model's verdict, in the ledger's order of checks; each side is (account, debited)."""
        if amount <= 0:
            return "INVALID_AMOUNT"
        if any(a.status != "ACTIVE" for a, _ in sides):
            return "ACCOUNT_INACTIVE"
        if any(a.currency != currency for a, _ in sides):
            return "CURRENCY_MISMATCH"
        if any(debited and self.available(a) < amount for a, debited in sides):
            return "INSUFFICIENT_FUNDS"
        return None

    @staticmethod
    def settle_refusal(kind: str, target: ModelHold, caller: str, amount: int | None) -> str | None:
        """The model's verdict on a post or void, in the rule order of docs/design/holds.md 2.4."""
        if caller == "stranger":
            return "TRANSFER_NOT_FOUND"
        if caller == "payer":
            return "NOT_PAYEE"
        if target.held is None or target.status in ("COMPLETED", "VOIDED"):
            return "TRANSFER_NOT_PENDING"
        if target.status == "EXPIRED" or target.remaining_s <= 0:  # lapsed, released or not
            return "HOLD_EXPIRED"
        if kind == "POST" and amount is not None and amount > target.held:
            return "EXCEEDS_HELD_AMOUNT"
        if kind == "POST" and (target.payer.status != "ACTIVE" or target.payee.status != "ACTIVE"):
            return "ACCOUNT_INACTIVE"
        return None

    def caller_metadata(self, caller: str, target: ModelHold) -> Metadata:
        if caller == "teller":
            return self.clients.teller
        return self.customer({"payee": target.payee.customer_id, "payer": target.payer.customer_id,
                              "stranger": STRANGER_ID}[caller])

    def record(self, kind: str, request: Request, metadata: Metadata, transfer: transfer_pb2.Transfer | None,
               reason: str | None, expected: str | None) -> bool:
        assert reason == expected, f"{kind}: ledger said {reason}, model says {expected}"
        self.run.outcomes[kind, expected or "OK"] += 1
        if expected is None:
            assert transfer is not None
            self.sent.append(Sent(kind, request, metadata, transfer))
        return expected is None

    def lapse(self, lapsing: list[ModelHold]) -> None:
        """Waits until the release worker (every second, in each svc_transfer) has moved every
        lapsed hold to EXPIRED: then the model releases them too."""
        if not lapsing:
            return
        ids = [h.transfer_id for h in lapsing]

        def released() -> bool | None:
            rows = sql(self.clients.settings, "SELECT count(*) FROM transfer.transfers"
                       " WHERE transfer_id = ANY(%s::uuid[]) AND status = 'EXPIRED'", (ids,))
            return True if rows[0][0] == len(ids) else None

        until(released, f"{len(ids)} lapsed holds released")
        for hold in lapsing:
            hold.status = "EXPIRED"
        self.run.outcomes["EXPIRE", "OK"] += len(lapsing)

    def age(self, holds: list[ModelHold], seconds: int) -> None:
        """Time passes for these holds: the database's expire_time and the model's move as one."""
        age_holds(self.clients.settings, [h.transfer_id for h in holds], seconds)
        for hold in holds:
            hold.expire_at -= seconds

    def off_the_boundary(self, holds: list[ModelHold]) -> None:
        """A PENDING hold within EXPIRY_MARGIN_S of its expiry is aged past it."""
        for hold in holds:
            if hold.status == "PENDING" and 0 < hold.remaining_s <= EXPIRY_MARGIN_S:
                self.age([hold], math.ceil(hold.remaining_s) + 1)

    # --- rules ---------------------------------------------------------------------------------

    def open(self, currency: str) -> str:
        account = ModelAccount(str(uuid.uuid4()), str(uuid.uuid4()), currency)
        self.clients.ledger.OpenLedgerAccount(
            ledger_pb2.OpenLedgerAccountRequest(account_id=account.account_id, customer_id=account.customer_id,
                                                currency=currency), metadata=self.clients.service, timeout=TIMEOUT_S)
        self.model[account.account_id] = account
        return account.account_id

    @initialize(funds=st.sampled_from([20_000, 0]),
                holds=st.lists(st.tuples(st.integers(0, USD_ACCOUNTS - 1), st.integers(1, USD_ACCOUNTS - 1),
                                         st.integers(1, 5_000), st.sampled_from([60, 3600])), max_size=3))
    def open_accounts(self, funds: int, holds: list[tuple[int, int, int, int]]) -> None:
        # A few accounts for the whole run, so rules meet the same ones again and again; mostly
        # funded and with a few holds, so that every example has money to move and holds to post,
        # void and let lapse, whichever rules it draws.
        self.ids = [self.open(c) for c in ACCOUNT_CURRENCIES]
        if funds:
            for index in range(len(self.ids)):
                self.deposit(index, funds, False)
        for source, offset, amount, hold_seconds in holds:
            self.hold(source, offset, False, amount, False, hold_seconds)

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

    def create_transfer(self, source: int, offset: int, same_account: bool, amount: int, as_stranger: bool,
                        currency_of_target: bool, hold_seconds: int | None) -> None:
        """A transfer, or with hold_seconds a hold: the same checks, against the available balance."""
        source_id = self.ids[source]
        target_id = source_id if same_account else self.ids[(source + offset) % len(self.ids)]
        from_account, to_account = self.model[source_id], self.model[target_id]
        currency = to_account.currency if currency_of_target else from_account.currency
        caller = to_account.customer_id if as_stranger else from_account.customer_id
        request = transfer_pb2.CreateTransferRequest(request_id=new_request_id(), from_account_id=source_id,
                                                     to_account_id=target_id, amount=amount, currency=currency,
                                                     hold_seconds=hold_seconds)
        kind = "TRANSFER" if hold_seconds is None else "HOLD"
        transfer, reason = self.call(kind, request, self.customer(caller))
        placed_at = time.monotonic()  # after the ledger's create_time: the model's expiry is never early
        if amount <= 0:
            expected: str | None = "INVALID_AMOUNT"
        elif source_id == target_id:
            expected = "SAME_ACCOUNT"
        elif caller != from_account.customer_id:
            expected = "ACCOUNT_NOT_FOUND"
        else:
            expected = self.movable_refusal(amount, currency, (from_account, True), (to_account, False))
        if not self.record(kind, request, self.customer(caller), transfer, reason, expected):
            return
        assert transfer is not None
        if hold_seconds is None:
            assert (transfer.status, transfer.amount, transfer.held_amount) == (transfer_pb2.Transfer.COMPLETED, amount, 0)
            from_account.balance -= amount
            to_account.balance += amount
            self.plain.append(ModelHold(transfer.transfer_id, from_account, to_account, None, amount, math.inf,
                                        request, "COMPLETED"))
        else:
            assert (transfer.status, transfer.amount, transfer.held_amount) == (transfer_pb2.Transfer.PENDING, amount, amount)
            self.holds.append(ModelHold(transfer.transfer_id, from_account, to_account, amount, amount,
                                        placed_at + hold_seconds, request))

    @rule(source=account_indexes, offset=st.integers(1, len(ACCOUNT_CURRENCIES) - 1), same_account=now_and_then(),
          amount=amounts, as_stranger=now_and_then(), currency_of_target=now_and_then())
    def transfer(self, source: int, offset: int, same_account: bool, amount: int, as_stranger: bool,
                 currency_of_target: bool) -> None:
        self.create_transfer(source, offset, same_account, amount, as_stranger, currency_of_target, None)

    @rule(source=st.integers(0, USD_ACCOUNTS - 1), offset=st.integers(1, USD_ACCOUNTS - 1), to_eur=now_and_then(),
          amount=amounts, as_stranger=now_and_then(), hold_seconds=st.sampled_from([60, 3600]))
    def hold(self, source: int, offset: int, to_eur: bool, amount: int, as_stranger: bool, hold_seconds: int) -> None:
        # Mostly between the USD accounts, so that the run has holds to post, void and let lapse;
        # the transfer rule already tries the odd accounts, which a hold meets alike.
        target = len(ACCOUNT_CURRENCIES) - 1 if to_eur else (source + offset) % USD_ACCOUNTS
        self.create_transfer(source, (target - source) % len(ACCOUNT_CURRENCIES), False, amount, as_stranger, False,
                             hold_seconds)

    def target(self, data: st.DataObject, plain: bool) -> ModelHold:
        """Mostly a hold (any status); now and then a plain transfer, which is never pending."""
        return data.draw(st.sampled_from(self.plain if plain and self.plain else self.holds))

    def settle(self, kind: str, target: ModelHold, caller: str, amount: int | None) -> None:
        request: transfer_pb2.PostTransferRequest | transfer_pb2.VoidTransferRequest
        if kind == "POST":
            request = transfer_pb2.PostTransferRequest(transfer_id=target.transfer_id, request_id=new_request_id(),
                                                       amount=amount)
        else:
            request = transfer_pb2.VoidTransferRequest(transfer_id=target.transfer_id, request_id=new_request_id())
        metadata = self.caller_metadata(caller, target)
        expected = self.settle_refusal(kind, target, caller, amount)
        transfer, reason, message = self.call_with_message(kind, request, metadata)
        if expected == "TRANSFER_NOT_PENDING":
            assert target.status in message, f"{kind}: '{message}' does not name {target.status}"
        if not self.record(kind, request, metadata, transfer, reason, expected):
            return
        assert transfer is not None and target.held is not None
        moved = target.held if amount is None else amount
        if kind == "POST":
            target.payer.balance -= moved
            target.payee.balance += moved
            target.status, target.amount = "COMPLETED", moved
        else:
            target.status = "VOIDED"
        assert (transfer.transfer_id, transfer_pb2.Transfer.Status.Name(transfer.status), transfer.amount,
                transfer.held_amount) == (target.transfer_id, target.status, target.amount, target.held)

    @precondition(lambda self: self.holds)
    @rule(data=st.data(), plain=now_and_then(), caller=st.sampled_from(CALLERS),
          how_much=st.sampled_from(["unset", "part", "held", "more than held"]))
    def post(self, data: st.DataObject, plain: bool, caller: str, how_much: str) -> None:
        target = self.target(data, plain)
        held = target.held or target.amount
        amount = {"unset": None, "held": held, "more than held": held + 1}.get(how_much)
        if how_much == "part":
            amount = data.draw(st.integers(1, held - 1)) if held > 1 else held
        self.settle("POST", target, caller, amount)

    @precondition(lambda self: self.holds)
    @rule(data=st.data(), plain=now_and_then(), caller=st.sampled_from(CALLERS))
    def void(self, data: st.DataObject, plain: bool, caller: str) -> None:
        self.settle("VOID", self.target(data, plain), caller, None)

    @precondition(lambda self: any(h.status == "PENDING" for h in self.holds))
    @rule(seconds=st.sampled_from([30, 61, 3601]), settle_at_once=now_and_then(), void_it=st.booleans())
    def time_passes(self, seconds: int, settle_at_once: bool, void_it: bool) -> None:
        pending = [h for h in self.holds if h.status == "PENDING"]
        self.age(pending, seconds)
        self.off_the_boundary(pending)
        lapsed = [h for h in pending if h.remaining_s <= 0]
        if settle_at_once and lapsed:
            # Most likely before the worker's next round: refused by the clock, released or not.
            self.settle("VOID" if void_it else "POST", lapsed[0], "payee", None)
        self.lapse(lapsed)

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
        elif status == "CLOSED" and (account.balance != 0 or self.pending_on(account)):
            expected = "ACCOUNT_NOT_EMPTY"
        else:
            expected = None
        assert reason == expected, f"set_status {status}: ledger said {reason}, model says {expected}"
        self.run.outcomes["SET_STATUS", expected or "OK"] += 1
        if expected is None:
            account.status = status

    @precondition(lambda self: self.sent)
    @rule(data=st.data(), change=st.booleans())
    def retry(self, data: st.DataObject, change: bool) -> None:
        """The same request_id: the first answer, whatever happened since; other parameters: refused."""
        sent = data.draw(st.sampled_from(self.sent))
        kind = sent.kind
        request: Request = type(sent.request).FromString(sent.request.SerializeToString())
        if change and isinstance(request, transfer_pb2.VoidTransferRequest):
            kind = "POST"  # the void's key on a post of the same hold
            request = transfer_pb2.PostTransferRequest(transfer_id=request.transfer_id, request_id=request.request_id)
        elif change and isinstance(request, transfer_pb2.PostTransferRequest):
            request.amount = request.amount + 1 if request.HasField("amount") else 1
        elif change:
            request.amount += 1  # type: ignore[union-attr]
        transfer, reason = self.call(kind, request, sent.metadata)
        self.run.outcomes["RETRY", reason or "OK"] += 1
        if change:
            assert reason == "IDEMPOTENCY_KEY_REUSED", f"{sent.kind} retried with other parameters: {reason}"
            return
        assert reason is None and transfer is not None, f"{sent.kind} retried: {reason}"
        first = transfer_pb2.Transfer()
        first.CopyFrom(sent.answer)
        if sent.kind == "HOLD":
            # age_holds rewrote the hold's expire_time since (the tests' one write to history).
            first.ClearField("expire_time")
            transfer.ClearField("expire_time")
        assert transfer == first, f"{sent.kind} retried: {transfer} is not the first answer {first}"

    # --- the invariant -------------------------------------------------------------------------

    @invariant()
    def ledger_matches_model(self) -> None:
        if not self.model:
            return
        # Real time passed during the step: a hold it brought near its expiry lapses now.
        near = [h for h in self.holds if h.status == "PENDING" and h.remaining_s <= EXPIRY_MARGIN_S]
        self.off_the_boundary(near)
        self.lapse(near)
        reply = self.clients.ledger.BatchGetLedgerAccounts(
            ledger_pb2.BatchGetLedgerAccountsRequest(account_ids=list(self.model)), metadata=self.clients.service,
            timeout=TIMEOUT_S)
        actual = {a.account_id: (a.balance, a.available_balance, ledger_pb2.LedgerAccount.Status.Name(a.status))
                  for a in reply.ledger_accounts}
        assert actual == {a.account_id: (a.balance, self.available(a), a.status) for a in self.model.values()}
        assert all(self.available(a) >= 0 for a in self.model.values())
        if self.holds:
            rows = sql(self.clients.settings, "SELECT transfer_id::text, status, amount FROM transfer.transfers"
                       " WHERE transfer_id = ANY(%s::uuid[])", ([h.transfer_id for h in self.holds],))
            assert dict((r[0], (r[1], r[2])) for r in rows) == {h.transfer_id: (h.status, h.amount) for h in self.holds}
        holds_invariants(self.clients.settings, self.ids)
        self.run.steps += 1

    def teardown(self) -> None:
        self.run.examples += 1


def test_ledger_behaves_like_the_model(stack: Stack, settings: Settings) -> None:
    tokens = test_tokens(settings)
    run = Run()
    started = time.monotonic()
    with grpc.insecure_channel(f"127.0.0.1:{settings.transfer_grpc_port}") as channel:
        LedgerModel.clients = Clients(
            settings, transfer_pb2_grpc.TransferServiceStub(channel), ledger_pb2_grpc.LedgerServiceStub(channel),
            tokens.service_metadata("tests"), [("authorization", f"Bearer {tokens.teller()}")], tokens.customer)
        LedgerModel.run = run
        run_state_machine_as_test(LedgerModel, settings=hypothesis_settings)  # type: ignore[no-untyped-call]
    figures.report(f"ledger model: {run.examples} examples, {run.steps} steps checked against the ledger, "
                   f"{time.monotonic() - started:.0f}s; outcomes: "
                   + ", ".join(f"{kind} {outcome} {count}" for (kind, outcome), count in sorted(run.outcomes.items())))
    # The run really placed holds and settled them (which reasons it met varies from run to run).
    assert run.outcomes["HOLD", "OK"] > 0
    assert run.outcomes["POST", "OK"] + run.outcomes["VOID", "OK"] + run.outcomes["EXPIRE", "OK"] > 0


# Bounded: on the 2-core machine these ran 21-28 examples, about 725 steps in 18-64 s, most of it in
# holds_invariants (its ledger-wide sums). No example database: the ledger is not replayable anyway.
hypothesis_settings = hypothesis_config(max_examples=20, stateful_step_count=40, deadline=None, database=None,
                                        suppress_health_check=[HealthCheck.too_slow])

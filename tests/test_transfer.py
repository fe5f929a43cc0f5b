"""Money movement (TransferService) against the real ledger in Postgres, over gRPC on
svc_transfer's own port: what each movement does to balances, entries and the outbox; who may
see what; every error reason with its status; idempotency. Envoy's REST and gRPC doors are
covered at the end."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import psycopg
from bank.events.v1 import events_pb2
from bank.transfer.v1 import ledger_pb2, transfer_pb2

from common import db
from common.config import Settings
from common.errors import reason_of
from svc_transfer import events as transfer_events
from tests.ledger_support import Account, Bank, new_request_id, refused, sql
from tests.support import rest

INT64_MAX = 2**63 - 1
Transfer = transfer_pb2.Transfer


async def funded(bank: Bank, amount: int, currency: str = "USD") -> Account:
    account = await bank.open_account(currency)
    if amount:
        await bank.deposit(account, amount)
    return account


# --- movements ------------------------------------------------------------------------------

async def test_deposit_transfer_and_withdrawal_move_money_between_balances(bank: Bank) -> None:
    alice, bob = await bank.open_account(), await bank.open_account()

    deposit = await bank.deposit(alice, 10_000)
    assert deposit.kind == Transfer.DEPOSIT and deposit.status == Transfer.COMPLETED
    assert deposit.from_account_id == "" and deposit.to_account_id == alice.account_id  # cash is never shown
    moved = await bank.transfer(alice, bob, 2_500, description="rent")
    assert (moved.kind, moved.from_account_id, moved.to_account_id, moved.amount, moved.currency, moved.description) \
        == (Transfer.TRANSFER, alice.account_id, bob.account_id, 2_500, "USD", "rent")
    withdrawal = await bank.withdraw(bob, 1_000)
    assert withdrawal.kind == Transfer.WITHDRAWAL
    assert withdrawal.from_account_id == bob.account_id and withdrawal.to_account_id == ""

    assert await bank.balances(alice, bob) == [7_500, 1_500]
    assert len({deposit.transfer_id, moved.transfer_id, withdrawal.transfer_id}) == 3


async def test_each_movement_writes_two_entries_summing_to_zero_and_one_money_moved_event(
        bank: Bank, settings: Settings) -> None:
    alice, bob = await bank.open_account(), await bank.open_account()
    deposit = await bank.deposit(alice, 900)
    moved = await bank.transfer(alice, bob, 300, description="dîner 🍝")
    withdrawal = await bank.withdraw(bob, 100)

    for transfer in (deposit, moved, withdrawal):
        entries = sql(settings, "SELECT amount, balance_after FROM transfer.entries WHERE transfer_id = %s"
                                " ORDER BY amount", (transfer.transfer_id,))
        assert len(entries) == 2 and sum(amount for amount, _ in entries) == 0
        assert entries[1][0] == transfer.amount
    events = sql(settings, "SELECT topic, aggregate_id, event_type, payload, headers, event_id::text"
                           " FROM transfer.outbox WHERE aggregate_id = ANY(%s) ORDER BY outbox_id",
                 ([deposit.transfer_id, moved.transfer_id, withdrawal.transfer_id],))
    assert [(e[0], e[1], e[2], bytes(e[3])) for e in events] == [
        ("bank.transfer.v1", t.transfer_id, "bank.events.v1.MoneyMoved", b"") for t in (deposit, moved, withdrawal)]
    # The bytes the relay publishes, built from the committed rows (svc_transfer/events.py).
    async with await psycopg.AsyncConnection.connect(db.conninfo(settings, "transfer")) as conn:
        payloads = await transfer_events.payloads(conn, [e[5] for e in events])
    decoded = [events_pb2.MoneyMoved.FromString(payloads[e[5]]) for e in events]
    assert all(d.event_id == e[5] for d, e in zip(decoded, events, strict=True))

    kinds = events_pb2.MoneyMoved
    d, m, w = decoded
    assert (d.kind, d.from_account_id, d.from_customer_id, d.to_account_id, d.to_customer_id, d.amount,
            d.from_balance_after, d.to_balance_after) == (kinds.DEPOSIT, "", "", alice.account_id, alice.customer_id,
                                                          900, 0, 900)
    assert (m.kind, m.from_account_id, m.from_customer_id, m.to_account_id, m.to_customer_id, m.amount,
            m.from_balance_after, m.to_balance_after, m.description) == (
        kinds.TRANSFER, alice.account_id, alice.customer_id, bob.account_id, bob.customer_id, 300, 600, 300,
        "dîner 🍝")
    assert (w.kind, w.from_account_id, w.to_account_id, w.to_customer_id, w.amount, w.from_balance_after,
            w.to_balance_after) == (kinds.WITHDRAWAL, bob.account_id, "", "", 100, 200, 0)
    assert m.transfer_id == moved.transfer_id and m.request_id == moved.request_id and m.currency == "USD"
    assert m.create_time == moved.create_time
    assert all(h.get("request_id") for *_, h, _ in events)  # the RPC's x-request-id, for tracing


# --- reading ----------------------------------------------------------------------------------

async def test_a_transfer_is_visible_to_the_owner_of_either_account_and_to_tellers_only(bank: Bank) -> None:
    alice, bob, eve = await funded(bank, 500), await bank.open_account(), await bank.open_account()
    moved = await bank.transfer(alice, bob, 200)
    get = transfer_pb2.GetTransferRequest(transfer_id=moved.transfer_id)

    for caller in (alice, bob):
        assert await bank.transfers.GetTransfer(get, metadata=bank.customer(caller.customer_id)) == moved
    assert await bank.transfers.GetTransfer(get, metadata=bank.teller) == moved
    # Someone else's transfer does not exist for eve; neither does an unknown or malformed id.
    for transfer_id in (moved.transfer_id, "01a20b55-c3f8-7574-a47b-005a8c12963c", "not-an-id"):
        assert await refused(bank.transfers.GetTransfer(transfer_pb2.GetTransferRequest(transfer_id=transfer_id),
                                                        metadata=bank.customer(eve.customer_id))) \
            == (grpc.StatusCode.NOT_FOUND, "TRANSFER_NOT_FOUND")


async def test_list_transfers_pages_an_accounts_movements_newest_first(bank: Bank) -> None:
    alice, bob = await funded(bank, 0), await bank.open_account()
    made = [await bank.deposit(alice, 1_000)]
    for amount in range(1, 6):
        made.append(await bank.transfer(alice, bob, amount))
    made.append(await bank.withdraw(alice, 7))
    made.append(await bank.transfer(bob, alice, 2))
    newest_first = [t.transfer_id for t in reversed(made)]

    seen: list[str] = []
    token = ""
    for expected_size in (3, 3, 2):
        page = await bank.transfers.ListTransfers(
            transfer_pb2.ListTransfersRequest(account_id=alice.account_id, page_size=3, page_token=token),
            metadata=bank.customer(alice.customer_id))
        assert len(page.transfers) == expected_size
        seen += [t.transfer_id for t in page.transfers]
        token = page.next_page_token
    assert token == "" and seen == newest_first
    assert (await bank.transfers.ListTransfers(transfer_pb2.ListTransfersRequest(account_id=alice.account_id),
                                               metadata=bank.teller)).transfers[0].transfer_id == newest_first[0]
    bobs = await bank.transfers.ListTransfers(transfer_pb2.ListTransfersRequest(account_id=bob.account_id),
                                              metadata=bank.customer(bob.customer_id))
    assert [t.transfer_id for t in bobs.transfers] == [newest_first[0], *newest_first[2:7]]


async def test_list_transfers_page_size_defaults_to_50_and_stops_at_500(bank: Bank) -> None:
    alice = await bank.open_account()
    # 501 deposits, 32 at a time: enough to see both limits.
    semaphore = asyncio.Semaphore(32)

    async def deposit() -> None:
        async with semaphore:
            await bank.deposit(alice, 1)
    await asyncio.gather(*(deposit() for _ in range(501)))
    list_request = transfer_pb2.ListTransfersRequest
    default = await bank.transfers.ListTransfers(list_request(account_id=alice.account_id), metadata=bank.teller)
    assert len(default.transfers) == 50 and default.next_page_token
    largest = await bank.transfers.ListTransfers(list_request(account_id=alice.account_id, page_size=10_000),
                                                 metadata=bank.teller)
    assert len(largest.transfers) == 500 and largest.next_page_token
    rest_of_it = await bank.transfers.ListTransfers(
        list_request(account_id=alice.account_id, page_size=500, page_token=largest.next_page_token),
        metadata=bank.teller)
    assert len(rest_of_it.transfers) == 1 and rest_of_it.next_page_token == ""


async def test_list_transfers_refuses_other_customers_accounts_and_bad_pages(bank: Bank) -> None:
    alice, bob = await funded(bank, 10), await funded(bank, 10)
    page = await bank.transfers.ListTransfers(transfer_pb2.ListTransfersRequest(account_id=alice.account_id, page_size=1),
                                              metadata=bank.customer(alice.customer_id))
    assert page.next_page_token == ""
    await bank.deposit(alice, 1)
    page = await bank.transfers.ListTransfers(transfer_pb2.ListTransfersRequest(account_id=alice.account_id, page_size=1),
                                              metadata=bank.customer(alice.customer_id))
    as_bob = bank.customer(bob.customer_id)
    for account_id in (alice.account_id, "5f0c6a86-0000-4000-8000-000000000000", "nope"):
        assert await refused(bank.transfers.ListTransfers(transfer_pb2.ListTransfersRequest(account_id=account_id),
                                                          metadata=as_bob)) == (grpc.StatusCode.NOT_FOUND,
                                                                                "ACCOUNT_NOT_FOUND")
    cases = [(-1, "", "INVALID_PAGE_SIZE"), (10, "garbage!", "INVALID_PAGE_TOKEN"),
             (10, page.next_page_token, "INVALID_PAGE_TOKEN")]  # alice's token on bob's list
    for page_size, token, reason in cases:
        request = transfer_pb2.ListTransfersRequest(account_id=bob.account_id, page_size=page_size, page_token=token)
        assert await refused(bank.transfers.ListTransfers(request, metadata=as_bob)) \
            == (grpc.StatusCode.INVALID_ARGUMENT, reason)


# --- every error reason ------------------------------------------------------------------------

async def test_invalid_amount_is_refused_before_the_database(bank: Bank) -> None:
    alice, bob = await funded(bank, 100), await bank.open_account()
    for amount in (0, -1, -INT64_MAX):
        assert await refused(bank.transfer(alice, bob, amount)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_AMOUNT")
        assert await refused(bank.deposit(alice, amount)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_AMOUNT")
        assert await refused(bank.withdraw(alice, amount)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_AMOUNT")
    assert await bank.balances(alice, bob) == [100, 0]


async def test_an_amount_that_would_overflow_a_balance_is_invalid(bank: Bank, settings: Settings) -> None:
    # GBP keeps this test's huge cash movement away from the other tests' currency. The cash
    # account holds minus the sum of the customers' GBP (never positive): the largest deposit it
    # can still pay without passing int64's minimum fills the whale's balance up to the top.
    [(cash,)] = sql(settings, "SELECT balance FROM transfer.ledger_accounts WHERE kind = 'CASH' AND currency = 'GBP'")
    assert cash <= 0
    fill = INT64_MAX + cash
    whale = await bank.open_account("GBP")
    await bank.deposit(whale, fill)
    try:
        # One more than fits: the whale's balance would pass int64's maximum.
        assert await refused(bank.deposit(whale, INT64_MAX - fill + 1)) \
            == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_AMOUNT")
    finally:
        await bank.withdraw(whale, fill)
    assert await bank.balances(whale) == [0]


async def test_malformed_fields_are_invalid_argument(bank: Bank) -> None:
    alice, bob = await funded(bank, 100), await bank.open_account()
    for request_id in ("", "x" * 65):
        assert await refused(bank.transfer(alice, bob, 1, request_id=request_id)) \
            == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert await refused(bank.transfer(alice, bob, 1, description="x" * 201)) \
        == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert await refused(bank.transfer(alice, bob, 1, currency="usd")) \
        == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    await bank.transfer(alice, bob, 1, request_id="x" * 64, description="x" * 200)  # the limits themselves are fine


async def test_same_account_on_both_sides_is_refused(bank: Bank) -> None:
    alice = await funded(bank, 100)
    assert await refused(bank.transfer(alice, alice, 1)) == (grpc.StatusCode.INVALID_ARGUMENT, "SAME_ACCOUNT")


async def test_currency_must_match_both_accounts(bank: Bank) -> None:
    dollars, euros = await funded(bank, 100), await funded(bank, 100, "EUR")
    mismatch = (grpc.StatusCode.FAILED_PRECONDITION, "CURRENCY_MISMATCH")
    assert await refused(bank.transfer(dollars, euros, 10)) == mismatch  # USD into an EUR account
    assert await refused(bank.transfer(dollars, euros, 10, currency="EUR")) == mismatch
    assert await refused(bank.deposit(dollars, 10, currency="EUR")) == mismatch
    assert await refused(bank.deposit(dollars, 10, currency="XXX")) == mismatch  # no such cash account
    assert await bank.balances(dollars, euros) == [100, 100]


async def test_insufficient_funds_leaves_balances_untouched(bank: Bank) -> None:
    alice, bob = await funded(bank, 100), await bank.open_account()
    insufficient = (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS")
    assert await refused(bank.transfer(alice, bob, 101)) == insufficient
    assert await refused(bank.withdraw(alice, 101)) == insufficient
    await bank.transfer(alice, bob, 100)  # exactly the balance is fine
    assert await bank.balances(alice, bob) == [0, 100]


async def test_frozen_or_closed_accounts_take_no_movements(bank: Bank) -> None:
    alice, bob = await funded(bank, 100), await funded(bank, 0)
    inactive = (grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_INACTIVE")
    await bank.set_status(bob, ledger_pb2.LedgerAccount.FROZEN)
    assert await refused(bank.transfer(alice, bob, 1)) == inactive
    assert await refused(bank.deposit(bob, 1)) == inactive
    await bank.set_status(alice, ledger_pb2.LedgerAccount.FROZEN)
    await bank.set_status(bob, ledger_pb2.LedgerAccount.ACTIVE)
    assert await refused(bank.transfer(alice, bob, 1)) == inactive
    assert await refused(bank.withdraw(alice, 1)) == inactive
    await bank.set_status(alice, ledger_pb2.LedgerAccount.ACTIVE)
    await bank.transfer(alice, bob, 1)
    await bank.set_status(bob, ledger_pb2.LedgerAccount.FROZEN)
    await bank.set_status(bob, ledger_pb2.LedgerAccount.ACTIVE)
    await bank.withdraw(bob, 1)
    await bank.set_status(bob, ledger_pb2.LedgerAccount.CLOSED)
    assert await refused(bank.transfer(alice, bob, 1)) == inactive
    assert await refused(bank.deposit(bob, 1)) == inactive
    assert await bank.balances(alice, bob) == [99, 0]


async def test_unknown_or_not_owned_accounts_are_not_found(bank: Bank, settings: Settings) -> None:
    alice, bob = await funded(bank, 100), await funded(bank, 100)
    ghost = Account("5f0c6a86-0000-4000-8000-000000000000", alice.customer_id, "USD")
    garbage = Account("not-a-uuid", alice.customer_id, "USD")
    [(cash_id,)] = sql(settings, "SELECT account_id::text FROM transfer.ledger_accounts WHERE kind = 'CASH' AND currency = 'USD'")
    cash = Account(cash_id, alice.customer_id, "USD")
    not_found = (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    assert await refused(bank.transfer(alice, cash, 1)) == not_found  # the cash account is never addressable
    assert await refused(bank.deposit(cash, 1)) == not_found
    assert await refused(bank.transfer(alice, ghost, 1)) == not_found
    assert await refused(bank.transfer(ghost, alice, 1)) == not_found
    assert await refused(bank.transfer(alice, garbage, 1)) == not_found
    assert await refused(bank.transfer(bob, alice, 1, caller=alice.customer_id)) == not_found  # not alice's
    assert await refused(bank.deposit(ghost, 1)) == not_found
    assert await refused(bank.withdraw(garbage, 1)) == not_found
    # A teller moves cash in and out; a transfer needs the source's owner.
    teller_transfer = bank.transfers.CreateTransfer(transfer_pb2.CreateTransferRequest(
        request_id=new_request_id(), from_account_id=alice.account_id, to_account_id=bob.account_id, amount=1,
        currency="USD"), metadata=bank.teller)
    assert await refused(teller_transfer) == not_found
    assert await bank.balances(alice, bob) == [100, 100]


async def test_deposits_and_withdrawals_are_for_tellers_and_everything_needs_a_token(bank: Bank) -> None:
    alice = await funded(bank, 100)
    as_alice = bank.customer(alice.customer_id)
    deposit = transfer_pb2.CreateDepositRequest(request_id=new_request_id(), account_id=alice.account_id, amount=5,
                                                currency="USD")
    withdrawal = transfer_pb2.CreateWithdrawalRequest(request_id=new_request_id(), account_id=alice.account_id,
                                                      amount=5, currency="USD")
    assert (await refused(bank.transfers.CreateDeposit(deposit, metadata=as_alice)))[0] == grpc.StatusCode.PERMISSION_DENIED
    assert (await refused(bank.transfers.CreateWithdrawal(withdrawal, metadata=as_alice)))[0] \
        == grpc.StatusCode.PERMISSION_DENIED
    assert (await refused(bank.transfers.CreateDeposit(deposit)))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert (await refused(bank.transfers.GetTransfer(transfer_pb2.GetTransferRequest(transfer_id="x"))))[0] \
        == grpc.StatusCode.UNAUTHENTICATED
    assert await bank.balances(alice) == [100]


# --- idempotency -----------------------------------------------------------------------------------

async def test_a_retry_returns_the_original_transfer_and_moves_nothing(bank: Bank, settings: Settings) -> None:
    alice, bob = await funded(bank, 1_000), await bank.open_account()
    request_id = new_request_id()
    first = await bank.transfer(alice, bob, 100, request_id=request_id, description="once")
    again = await bank.transfer(alice, bob, 100, request_id=request_id, description="once")
    assert again == first
    deposit_id = new_request_id()
    assert await bank.deposit(bob, 5, request_id=deposit_id) == await bank.deposit(bob, 5, request_id=deposit_id)
    assert await bank.balances(alice, bob) == [900, 105]
    assert sql(settings, "SELECT count(*) FROM transfer.transfers WHERE request_id = %s", (request_id,)) == [(1,)]


async def test_a_request_id_reused_with_other_parameters_is_a_conflict(bank: Bank) -> None:
    alice, bob = await funded(bank, 1_000), await bank.open_account()
    request_id = new_request_id()
    await bank.transfer(alice, bob, 100, request_id=request_id)
    reused = (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    assert await refused(bank.transfer(alice, bob, 101, request_id=request_id)) == reused
    assert await refused(bank.transfer(alice, bob, 100, request_id=request_id, description="other")) == reused
    await bank.withdraw(alice, 100, request_id=request_id)  # the teller's keys are another scope
    assert await bank.balances(alice, bob) == [800, 100]


async def test_request_ids_are_scoped_to_the_caller(bank: Bank) -> None:
    alice, bob = await funded(bank, 1_000), await funded(bank, 1_000)
    request_id = new_request_id()
    one = await bank.transfer(alice, bob, 10, request_id=request_id)
    other = await bank.transfer(bob, alice, 10, request_id=request_id)
    assert one.transfer_id != other.transfer_id
    assert await bank.balances(alice, bob) == [1_000, 1_000]


async def test_a_refused_request_is_not_remembered_so_a_retry_can_succeed(bank: Bank) -> None:
    alice, bob = await funded(bank, 50), await bank.open_account()
    request_id = new_request_id()
    assert await refused(bank.transfer(alice, bob, 80, request_id=request_id)) \
        == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS")
    await bank.deposit(alice, 50)
    moved = await bank.transfer(alice, bob, 80, request_id=request_id)
    assert moved.amount == 80 and await bank.balances(alice, bob) == [20, 80]


async def test_concurrent_requests_with_one_request_id_move_money_once(bank: Bank, settings: Settings) -> None:
    alice, bob = await funded(bank, 1_000), await bank.open_account()
    request_id = new_request_id()
    results = await asyncio.gather(*(bank.transfer(alice, bob, 100, request_id=request_id) for _ in range(24)))
    assert len({r.transfer_id for r in results}) == 1
    assert await bank.balances(alice, bob) == [900, 100]

    # Same key, different amounts, all at once: one wins, every other is a conflict or its replay.
    contested = new_request_id()
    outcomes = await asyncio.gather(*(bank.transfer(alice, bob, amount, request_id=contested)
                                      for amount in range(1, 17)), return_exceptions=True)
    winners = [o for o in outcomes if isinstance(o, transfer_pb2.Transfer)]
    losers = [o for o in outcomes if not isinstance(o, transfer_pb2.Transfer)]
    assert len(winners) == 1 and len(losers) == 15
    assert all(isinstance(e, grpc.aio.AioRpcError) and reason_of(e) == "IDEMPOTENCY_KEY_REUSED" for e in losers)
    assert await bank.balances(alice, bob) == [900 - winners[0].amount, 100 + winners[0].amount]
    assert sql(settings, "SELECT count(*) FROM transfer.idempotency_keys WHERE request_id = %s", (contested,)) == [(1,)]


# --- through Envoy -------------------------------------------------------------------------------

async def test_public_rpcs_over_rest_through_envoy(bank: Bank, settings: Settings) -> None:
    alice, bob, eve = await bank.open_account(), await bank.open_account(), await bank.open_account()
    teller = bank.teller[0][1].removeprefix("Bearer ")
    alice_token, eve_token = bank.token_of(alice.customer_id), bank.token_of(eve.customer_id)

    def call(method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        return rest(settings, method, path, body, token=token)

    deposit = call("POST", "/v1/deposits", {"request_id": new_request_id(), "account_id": alice.account_id,
                                            "amount": 1000, "currency": "USD", "description": "cash"}, teller)
    assert deposit.status == 200, deposit.body
    assert deposit.body["amount"] == "1000" and deposit.body["kind"] == "DEPOSIT"  # int64 as a JSON string
    body = {"request_id": new_request_id(), "from_account_id": alice.account_id, "to_account_id": bob.account_id,
            "amount": "250", "currency": "USD"}
    moved = call("POST", "/v1/transfers", body, alice_token)
    assert moved.status == 200, moved.body
    assert moved.body["status"] == "COMPLETED" and moved.body["from_account_id"] == alice.account_id
    assert call("POST", "/v1/transfers", body, alice_token).body["transfer_id"] == moved.body["transfer_id"]
    fetched = call("GET", f"/v1/transfers/{moved.body['transfer_id']}", token=alice_token)
    assert fetched.status == 200 and fetched.body == moved.body
    listed = call("GET", f"/v1/accounts/{alice.account_id}/transfers?page_size=1", token=alice_token)
    assert listed.status == 200 and [t["transfer_id"] for t in listed.body["transfers"]] == [moved.body["transfer_id"]]
    assert listed.body["next_page_token"]
    withdrawal = call("POST", "/v1/withdrawals", {"request_id": new_request_id(), "account_id": bob.account_id,
                                                  "amount": "50", "currency": "USD"}, teller)
    assert withdrawal.status == 200 and withdrawal.body["to_account_id"] == ""

    # Each error's HTTP status and reason, as a client sees them.
    errors = [
        (call("POST", "/v1/transfers", {**body, "request_id": new_request_id(), "amount": "100000"}, alice_token),
         400, "INSUFFICIENT_FUNDS"),
        (call("POST", "/v1/transfers", {**body, "amount": "1"}, alice_token), 409, "IDEMPOTENCY_KEY_REUSED"),
        (call("POST", "/v1/transfers", {**body, "request_id": new_request_id(), "amount": "0"}, alice_token),
         400, "INVALID_AMOUNT"),
        (call("POST", "/v1/transfers", {**body, "request_id": new_request_id()}, eve_token), 404, "ACCOUNT_NOT_FOUND"),
        (call("GET", f"/v1/transfers/{moved.body['transfer_id']}", token=eve_token), 404, "TRANSFER_NOT_FOUND"),
        (call("POST", "/v1/deposits", {"request_id": new_request_id(), "account_id": alice.account_id,
                                       "amount": "1", "currency": "USD"}, alice_token), 403, None),
        (call("POST", "/v1/transfers", body), 401, None),
    ]
    for response, status, reason in errors:
        assert response.status == status, response.body
        if reason is not None:
            assert response.reason == reason, response.body
    # Beyond int64 the gateway refuses the JSON before any service sees it.
    too_big = call("POST", "/v1/transfers", {**body, "request_id": new_request_id(), "amount": str(2**63)}, alice_token)
    assert too_big.status == 400
    assert await bank.balances(alice, bob) == [750, 200]


async def test_grpc_through_envoy(bank: Bank, settings: Settings) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.envoy_port}") as gateway_channel:
        gateway = Bank(settings, gateway_channel)
        gateway.ledger = bank.ledger  # internal: never through Envoy
        alice, bob = await gateway.open_account(), await gateway.open_account()
        await gateway.deposit(alice, 300)
        moved = await gateway.transfer(alice, bob, 120)
        assert moved.amount == 120
        assert await refused(gateway.transfer(alice, bob, 1_000)) \
            == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS")
        assert await gateway.balances(alice, bob) == [180, 120]


# --- operating errors ----------------------------------------------------------------------------

async def test_a_lock_held_too_long_makes_the_ledger_busy_and_a_retry_succeeds(bank: Bank, settings: Settings) -> None:
    """A lock wait is bounded (the movement function's lock_timeout): the caller gets UNAVAILABLE
    LEDGER_BUSY, nothing is written, and the same request_id works once the lock is gone."""
    alice, bob = await funded(bank, 100), await bank.open_account()
    request_id = new_request_id()
    async with await psycopg.AsyncConnection.connect(settings.pg_conninfo) as blocker:
        await blocker.execute("SELECT 1 FROM transfer.ledger_accounts WHERE account_id = %s FOR UPDATE",
                              (bob.account_id,))
        assert await refused(bank.transfer(alice, bob, 10, request_id=request_id)) \
            == (grpc.StatusCode.UNAVAILABLE, "LEDGER_BUSY")
        await blocker.rollback()
    assert await bank.balances(alice, bob) == [100, 0]
    assert (await bank.transfer(alice, bob, 10, request_id=request_id)).amount == 10
    assert await bank.balances(alice, bob) == [90, 10]

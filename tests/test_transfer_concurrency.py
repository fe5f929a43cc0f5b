"""The ledger's invariants under concurrency, against the real stack: many clients moving money
at once over grpc.aio, hot accounts, opposite directions, overdraft attempts and repeated
request_ids. Afterwards the books must balance exactly, and Postgres must have seen no deadlock."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from bank.transfer.v1 import transfer_pb2

from common.config import Settings
from common.errors import reason_of
from tests.ledger_support import Account, Bank, deadlocks, new_request_id, sql

ACCOUNTS = 50
HOT_ACCOUNTS = 5  # half of the transfers touch one of these
CLIENTS = 32
MOVEMENTS = 5_000
INITIAL_BALANCE = 20_000
SEED = 20261124


@dataclass(frozen=True)
class Intent:
    """One logical request; a repeat sends the very same request (same request_id) again."""

    kind: str  # TRANSFER, DEPOSIT, WITHDRAWAL
    request_id: str
    source: Account | None
    target: Account | None
    amount: int


async def send(bank: Bank, intent: Intent) -> transfer_pb2.Transfer:
    if intent.kind == "DEPOSIT":
        assert intent.target is not None
        return await bank.deposit(intent.target, intent.amount, request_id=intent.request_id)
    if intent.kind == "WITHDRAWAL":
        assert intent.source is not None
        return await bank.withdraw(intent.source, intent.amount, request_id=intent.request_id)
    assert intent.source is not None and intent.target is not None
    return await bank.transfer(intent.source, intent.target, intent.amount, request_id=intent.request_id)


def plan(accounts: list[Account], rng: random.Random) -> list[Intent]:
    hot = accounts[:HOT_ACCOUNTS]
    intents: list[Intent] = []
    while len(intents) < MOVEMENTS:
        roll = rng.random()
        if roll < 0.12 and intents:  # the same request again (a client retrying), maybe while the first is in flight
            intents.append(rng.choice(intents[-200:]))
            continue
        if roll < 0.17:
            intents.append(Intent("DEPOSIT", new_request_id(), None, rng.choice(accounts), rng.randint(1, 5_000)))
            continue
        if roll < 0.22:
            intents.append(Intent("WITHDRAWAL", new_request_id(), rng.choice(accounts), None, rng.randint(1, 30_000)))
            continue
        pool = hot if rng.random() < 0.5 else accounts
        source, target = rng.sample(pool, 2)
        # One in ten asks for more than any account is likely to hold: an overdraft attempt.
        amount = rng.randint(40_000, 200_000) if rng.random() < 0.1 else rng.randint(1, 3_000)
        intents.append(Intent("TRANSFER", new_request_id(), source, target, amount))
        if rng.random() < 0.2:  # and the opposite direction right behind it
            intents.append(Intent("TRANSFER", new_request_id(), target, source, rng.randint(1, 3_000)))
    return intents[:MOVEMENTS]


async def run_clients(banks: list[Bank], work: list[Callable[[Bank], Awaitable[None]]]) -> None:
    queue: asyncio.Queue[Callable[[Bank], Awaitable[None]]] = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)

    async def client(index: int) -> None:
        bank = banks[index % len(banks)]
        while not queue.empty():
            await queue.get_nowait()(bank)
    await asyncio.gather(*(client(i) for i in range(CLIENTS)))


async def test_invariants_hold_under_concurrent_random_movements(banks: list[Bank], settings: Settings) -> None:
    bank = banks[0]
    rng = random.Random(SEED)
    accounts = list(await asyncio.gather(*(bank.open_account() for _ in range(ACCOUNTS))))
    await asyncio.gather(*(bank.deposit(a, INITIAL_BALANCE) for a in accounts))
    ours = [a.account_id for a in accounts]
    deadlocks_before = deadlocks(settings)
    intents = plan(accounts, rng)

    outcomes: dict[str, list[str]] = defaultdict(list)  # request_id -> transfer ids it was answered with
    applied: dict[str, Intent] = {}  # transfer_id -> the intent that moved money
    refusals: Counter[str | None] = Counter()

    def job(intent: Intent) -> Callable[[Bank], Awaitable[None]]:
        async def run(client: Bank) -> None:
            try:
                transfer = await send(client, intent)
            except grpc.aio.AioRpcError as error:
                refusals[reason_of(error) or error.code().name] += 1
                return
            assert transfer.amount == intent.amount
            outcomes[intent.request_id].append(transfer.transfer_id)
            applied[transfer.transfer_id] = intent
        return run

    started = time.monotonic()
    await run_clients(banks, [job(intent) for intent in intents])
    elapsed_s = time.monotonic() - started
    print(f"{MOVEMENTS} requests by {CLIENTS} clients in {elapsed_s:.1f}s ({MOVEMENTS / elapsed_s:.0f}/s);"
          f" {len(applied)} movements; refusals {dict(refusals)}")

    # Only business refusals: no timeout, no busy ledger, no internal error, no deadlock.
    assert set(refusals) <= {"INSUFFICIENT_FUNDS"}, refusals
    assert refusals["INSUFFICIENT_FUNDS"] > 0 and len(applied) > MOVEMENTS // 2  # the mix did what it meant to
    assert deadlocks(settings) == deadlocks_before

    # Every request_id moved money at most once, however often it was sent.
    assert all(len(set(ids)) == 1 for ids in outcomes.values())
    assert any(len(ids) > 1 for ids in outcomes.values())  # repeats did happen
    repeated = sql(settings, "SELECT request_id FROM transfer.transfers WHERE request_id = ANY(%s)"
                             " GROUP BY request_id HAVING count(*) > 1", (list(outcomes),))
    assert repeated == []

    # Balances are the funding plus exactly the movements the clients were told about...
    expected = {a.account_id: INITIAL_BALANCE for a in accounts}
    for intent in applied.values():
        if intent.source is not None:
            expected[intent.source.account_id] -= intent.amount
        if intent.target is not None:
            expected[intent.target.account_id] += intent.amount
    assert dict(zip(ours, await bank.balances(*accounts), strict=True)) == expected

    # ...and the ledger agrees with itself.
    assert sql(settings, "SELECT currency, sum(balance) FROM transfer.ledger_accounts GROUP BY currency"
                         " HAVING sum(balance) <> 0") == []  # all money came from the cash accounts
    assert sql(settings, "SELECT count(*) FROM transfer.ledger_accounts WHERE kind = 'CUSTOMER' AND balance < 0") \
        == [(0,)]
    transfers = sql(settings, "SELECT DISTINCT transfer_id::text FROM transfer.entries WHERE account_id = ANY(%s::uuid[])",
                    (ours,))
    transfer_ids = [t for (t,) in transfers]
    assert set(applied) <= set(transfer_ids)  # plus the funding deposits
    assert len(transfer_ids) == len(applied) + ACCOUNTS
    unbalanced = sql(settings, "SELECT transfer_id FROM transfer.entries WHERE transfer_id = ANY(%s::uuid[])"
                               " GROUP BY transfer_id HAVING count(*) <> 2 OR sum(amount) <> 0", (transfer_ids,))
    assert unbalanced == []
    drift = sql(settings, "SELECT a.account_id FROM transfer.ledger_accounts a JOIN transfer.entries e USING (account_id)"
                          " WHERE a.account_id = ANY(%s::uuid[]) GROUP BY a.account_id, a.balance"
                          " HAVING a.balance <> sum(e.amount)", (ours,))
    assert drift == []
    events = sql(settings, "SELECT aggregate_id, count(*) FROM transfer.outbox WHERE aggregate_id = ANY(%s)"
                           " GROUP BY aggregate_id", (transfer_ids,))
    assert len(events) == len(transfer_ids) and all(count == 1 for _, count in events)


async def test_opposite_directions_never_deadlock(banks: list[Bank], settings: Settings) -> None:
    """Movements lock their two accounts in ascending id order, so A→B and B→A queue instead of
    deadlocking, whichever direction grabs a row first; cash movements on the same rows too."""
    bank = banks[0]
    alice, bob = await bank.open_account(), await bank.open_account()
    await asyncio.gather(bank.deposit(alice, 1_000_000), bank.deposit(bob, 1_000_000))
    deadlocks_before = deadlocks(settings)
    rounds = 40

    def ping_pong(client_index: int) -> list[Callable[[Bank], Awaitable[None]]]:
        work: list[Callable[[Bank], Awaitable[None]]] = []
        for i in range(rounds):
            source, target = (alice, bob) if (client_index + i) % 2 == 0 else (bob, alice)
            if i % 10 == 9:  # now and then the cash account joins in, on either row
                work.append(lambda b, s=source: b.withdraw(s, 1))  # type: ignore[misc]
                work.append(lambda b, t=target: b.deposit(t, 1))  # type: ignore[misc]
            else:
                work.append(lambda b, s=source, t=target: b.transfer(s, t, 1))  # type: ignore[misc]
        return work

    async def client(index: int) -> int:
        done = 0
        for item in ping_pong(index):
            await item(banks[index % len(banks)])
            done += 1
        return done
    done = await asyncio.gather(*(client(i) for i in range(CLIENTS)))  # any error fails the test
    assert sum(done) == CLIENTS * (rounds + rounds // 10)
    assert deadlocks(settings) == deadlocks_before
    assert sum(await bank.balances(alice, bob)) == 2_000_000

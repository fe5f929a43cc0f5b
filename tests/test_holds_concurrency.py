"""Holds under concurrency, against the real stack (API.md "Holds", design holds.md section 6):
many holds against one available balance, holds racing transfers and withdrawals on one payer,
a post, a void and the release worker racing for each of many holds, holds and posts in
opposite directions. Requests go over several connections, so both svc_transfer processes
serve them. Afterwards the books balance, every hold is settled at most once with one event,
and Postgres has seen no deadlock."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable
from typing import TypeVar

import grpc
from bank.transfer.v1 import transfer_pb2

from common.config import Settings
from common.errors import reason_of
from tests.ledger_support import Account, Bank, age_holds, deadlocks, holds_invariants, sql, transfer_rows
from tests.support import until

T = TypeVar("T")
Transfer = transfer_pb2.Transfer
SEED = 20261207
SETTLED_EVENTS = ("bank.events.v1.HoldPosted", "bank.events.v1.HoldVoided", "bank.events.v1.HoldExpired")
LOSING_REASONS = {"TRANSFER_NOT_PENDING", "HOLD_EXPIRED"}


async def outcome(call: Awaitable[T]) -> T | str:
    """The answer of a call, or the reason (else the status name) it was refused with."""
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        return reason_of(error) or error.code().name


def pending_sum(settings: Settings, account: Account) -> int:
    [(total,)] = sql(settings, "SELECT coalesce(sum(held_amount), 0) FROM transfer.transfers"
                               " WHERE from_account_id = %s AND status = 'PENDING'", (account.account_id,))
    return int(total)


async def test_holds_at_once_against_one_balance_take_exactly_what_is_available(
        banks: list[Bank], settings: Settings) -> None:
    bank = banks[0]
    payer, payees = await bank.open_account(), [await bank.open_account() for _ in range(4)]
    await bank.deposit(payer, 1_000)
    deadlocks_before = deadlocks(settings)

    answers = await asyncio.gather(*(
        outcome(banks[i % len(banks)].hold(payer, payees[i % len(payees)], 30)) for i in range(64)))

    placed = [a for a in answers if isinstance(a, Transfer)]
    assert Counter(a if isinstance(a, str) else "PLACED" for a in answers) \
        == {"PLACED": 33, "INSUFFICIENT_FUNDS": 31}  # 33 * 30 = 990 of 1,000
    assert all((p.status, p.held_amount) == (Transfer.PENDING, 30) for p in placed)
    assert await bank.available(payer) == [(1_000, 10)]
    assert pending_sum(settings, payer) == 990  # balance - available = the PENDING holds
    assert await bank.available(*payees) == [(0, 0)] * len(payees)  # incoming holds do not count
    assert deadlocks(settings) == deadlocks_before
    holds_invariants(settings, [payer.account_id] + [p.account_id for p in payees])


async def test_holds_racing_transfers_and_withdrawals_never_overdraw_the_payer(
        banks: list[Bank], settings: Settings) -> None:
    """Nothing is released during the race, so the available balance only falls: a request
    refused for funds asked more than what was left at the end, and what succeeded adds up to
    exactly what was taken."""
    rng = random.Random(SEED)
    bank = banks[0]
    payer, payee = await bank.open_account(), await bank.open_account()
    funds = 2_000
    await bank.deposit(payer, funds)
    kinds = ["HOLD", "TRANSFER", "WITHDRAWAL"]
    plan = [(kinds[i % 3], rng.choice((20, 30, 50, 70))) for i in range(120)]  # ~5,000 asked of 2,000
    rng.shuffle(plan)

    def send(i: int, kind: str, amount: int) -> Awaitable[Transfer]:
        client = banks[i % len(banks)]
        if kind == "HOLD":
            return client.hold(payer, payee, amount)
        if kind == "TRANSFER":
            return client.transfer(payer, payee, amount)
        return client.withdraw(payer, amount)

    answers = await asyncio.gather(*(outcome(send(i, kind, amount)) for i, (kind, amount) in enumerate(plan)))

    refusals = Counter(a for a in answers if isinstance(a, str))
    assert set(refusals) == {"INSUFFICIENT_FUNDS"}, refusals  # nothing else: no busy ledger, no deadlock
    taken = {kind: sum(amount for (k, amount), a in zip(plan, answers, strict=True) if k == kind and not isinstance(a, str))
             for kind in kinds}
    assert all(taken.values()), taken  # each kind got some of the money
    [(balance, available)] = await bank.available(payer)
    assert balance == funds - taken["TRANSFER"] - taken["WITHDRAWAL"]
    assert available == balance - taken["HOLD"] >= 0
    assert pending_sum(settings, payer) == taken["HOLD"]
    refused_amounts = [amount for (_, amount), a in zip(plan, answers, strict=True) if isinstance(a, str)]
    assert min(refused_amounts) > available  # no refusal that the balance could still have served
    assert await bank.available(payee) == [(taken["TRANSFER"], taken["TRANSFER"])]
    holds_invariants(settings, [payer.account_id, payee.account_id])


async def test_post_void_and_expiry_racing_for_each_hold_settle_it_exactly_once(
        banks: list[Bank], settings: Settings) -> None:
    """Each hold is hit at once by a post (its payee) and a void (a teller), on two connections.
    A third of the holds have lapsed when they are hit, so the release worker races too; another
    third lapse about when they are hit, so a post or void may come just before or after."""
    rng = random.Random(SEED)
    bank = banks[0]
    payers = [await bank.open_account() for _ in range(8)]
    payees = [await bank.open_account() for _ in range(8)]
    await asyncio.gather(*(bank.deposit(p, 10_000) for p in payers))
    count = 150
    plan = [(payers[i % 8], payees[(i * 3 + i // 8) % 8], rng.randint(10, 60)) for i in range(count)]
    holds = list(await asyncio.gather(*(
        banks[i % len(banks)].hold(source, target, amount) for i, (source, target, amount) in enumerate(plan))))
    ids = [h.transfer_id for h in holds]
    lapsed, lapsing = set(ids[0::3]), set(ids[1::3])
    deadlocks_before = deadlocks(settings)

    # Lapsed: expire_time in the past. Lapsing: expire_time about 1.5 s ahead, when the jittered
    # posts and voids below arrive (by the database's clock, which decides).
    age_holds(settings, sorted(lapsed), 3_600)
    [(now,)] = sql(settings, "SELECT clock_timestamp()")
    for h in holds:
        if h.transfer_id in lapsing:
            ahead_s = (h.expire_time.ToDatetime(tzinfo=now.tzinfo) - now).total_seconds() - 1.5
            age_holds(settings, [h.transfer_id], ahead_s)

    async def race(i: int, h: Transfer) -> tuple[Transfer | str, Transfer | str]:
        target = plan[i][1]
        if h.transfer_id in lapsing:
            await asyncio.sleep(rng.uniform(0.0, 2.5))
        posting = outcome(banks[i % len(banks)].post(h.transfer_id, bank.customer(target.customer_id)))
        voiding = outcome(banks[(i + 1) % len(banks)].void(h.transfer_id, bank.teller))
        if i % 2:  # each goes first half the time: on one connection the first sent is applied first
            voided, posted = await asyncio.gather(voiding, posting)
            return posted, voided
        return await asyncio.gather(posting, voiding)

    answers = await asyncio.gather(*(race(i, h) for i, h in enumerate(holds)))

    def settled() -> dict[str, tuple[str, int]] | None:
        found = {transfer_id: (row.status, row.amount) for transfer_id, row in transfer_rows(settings, ids).items()}
        return None if any(status == "PENDING" for status, _ in found.values()) else found

    final = await asyncio.to_thread(until, settled, "every hold settled or released", 30)
    seen: Counter[str] = Counter()
    for h, (posted, voided) in zip(holds, answers, strict=True):
        winners = [a for a in (posted, voided) if isinstance(a, Transfer)]
        losers = {a for a in (posted, voided) if isinstance(a, str)}
        assert losers <= LOSING_REASONS, (h.transfer_id, losers)
        status, amount = final[h.transfer_id]
        assert len(winners) <= 1, h.transfer_id
        if winners:
            assert h.transfer_id not in lapsed
            assert (Transfer.Status.Name(winners[0].status), winners[0].amount) == (status, amount)
        else:
            assert h.transfer_id in lapsed | lapsing, (h.transfer_id, losers)
            assert status == "EXPIRED"
        seen[f"lapsed {status}" if h.transfer_id in lapsed else f"lapsing {status}" if h.transfer_id in lapsing
             else status] += 1
    print(f"{count} holds: {dict(seen)}")
    # Each race did happen: posts and voids won, the worker released every lapsed hold.
    assert seen["lapsed EXPIRED"] == len(lapsed), seen
    assert seen["COMPLETED"] + seen["lapsing COMPLETED"] and seen["VOIDED"] + seen["lapsing VOIDED"], seen

    events = sql(settings, "SELECT aggregate_id, count(*) FILTER (WHERE event_type = ANY(%s)),"
                           " count(*) FILTER (WHERE event_type = 'bank.events.v1.HoldPlaced'),"
                           " count(*) FILTER (WHERE event_type = 'bank.events.v1.MoneyMoved')"
                           " FROM transfer.outbox WHERE aggregate_id = ANY(%s) GROUP BY aggregate_id",
                 (list(SETTLED_EVENTS), ids))
    assert {aggregate_id: (settlements, placements, moved) for aggregate_id, settlements, placements, moved in events} \
        == {i: (1, 1, int(final[i][0] == "COMPLETED")) for i in ids}
    assert deadlocks(settings) == deadlocks_before

    posted_by = Counter[str]()
    received_by = Counter[str]()
    for (source, target, _), h in zip(plan, holds, strict=True):
        status, amount = final[h.transfer_id]
        if status == "COMPLETED":
            posted_by[source.account_id] += amount
            received_by[target.account_id] += amount
    assert await bank.available(*payers) == [(10_000 - posted_by[p.account_id],) * 2 for p in payers]
    assert await bank.available(*payees) == [(received_by[p.account_id],) * 2 for p in payees]
    holds_invariants(settings, [a.account_id for a in payers + payees])


async def test_holds_and_posts_in_opposite_directions_never_deadlock(banks: list[Bank], settings: Settings) -> None:
    """A post locks its hold's row, then its two accounts in ascending id order, as a transfer
    does: A->B and B->A holds, posts, voids and transfers queue instead of deadlocking."""
    bank = banks[0]
    alice, bob = await bank.open_account(), await bank.open_account()
    await asyncio.gather(bank.deposit(alice, 1_000_000), bank.deposit(bob, 1_000_000))
    deadlocks_before = deadlocks(settings)
    clients, rounds = 16, 12

    async def client(index: int) -> int:
        mine = banks[index % len(banks)]
        moved = 0
        for i in range(rounds):
            source, target = (alice, bob) if (index + i) % 2 == 0 else (bob, alice)
            placed = await mine.hold(source, target, 3)
            if i % 4 == 3:
                await mine.void(placed.transfer_id, mine.teller)
            else:
                settled = await mine.post(placed.transfer_id, mine.customer(target.customer_id), amount=2)
                assert settled.amount == 2
                moved += 2 if source is alice else -2
            await mine.transfer(target, source, 1)  # and a plain transfer the other way behind it
            moved -= 1 if source is alice else -1
        return moved

    moved = sum(await asyncio.gather(*(client(i) for i in range(clients))))  # any error fails the test
    assert deadlocks(settings) == deadlocks_before
    assert await bank.available(alice, bob) == [(1_000_000 - moved,) * 2, (1_000_000 + moved,) * 2]
    holds_invariants(settings, [alice.account_id, bob.account_id])

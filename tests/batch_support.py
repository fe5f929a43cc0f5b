"""What the tests of svc_transfer's store share (tests/test_transfer_batches.py,
tests/test_ledger_plans.py: batches sent to store.move_money_batch directly, on the `pool`
fixture of tests/conftest.py): a MovementRequest of each kind, as svc_transfer's service builds
them."""

from __future__ import annotations

import dataclasses

from svc_transfer.store import MovementRequest
from tests.ledger_support import Account, new_request_id


def transfer(source: Account, target: Account, amount: int, request_id: str | None = None) -> MovementRequest:
    return MovementRequest(f"customer:{source.customer_id}", request_id or new_request_id(), "TRANSFER",
                           source.customer_id, source.account_id, target.account_id, amount, source.currency, "", {})


def deposit(target: Account, amount: int) -> MovementRequest:
    return MovementRequest("teller:tests", new_request_id(), "DEPOSIT", None, None, target.account_id, amount,
                           target.currency, "", {})


def hold(source: Account, target: Account, amount: int, hold_seconds: int = 3600,
         request_id: str | None = None) -> MovementRequest:
    return dataclasses.replace(transfer(source, target, amount, request_id), hold_seconds=hold_seconds)


def settle(kind: str, payee: Account, hold_id: str, amount: int | None = None, request_id: str | None = None,
           owner_id: str | None = None) -> MovementRequest:
    """A POST or VOID by the payee's owner (or by owner_id)."""
    owner = owner_id or payee.customer_id
    return MovementRequest(f"customer:{owner}", request_id or new_request_id(), kind, owner, None, None, amount, "",
                           "", {}, hold_id=hold_id)

"""Holds (#18) end to end, seen by the payer's inbox: a hold placed through Envoy, then voided by
the payee or lapsed, brings the payer exactly one HOLD_RELEASED email (and the payee none); a
released hold never makes a statement line."""

from __future__ import annotations

import uuid
from typing import Any

from common.config import Settings
from devstack.stack import Stack
from tests.events_support import Holder, deposit, holder, mails, mails_with, statement_with, teller_token
from tests.ledger_support import age_holds
from tests.support import mailpit_text, rest, until

AMOUNT_FUNDED = 5000
# The release worker frees a lapsed hold within seconds; this bounds a hang, it measures nothing.
RELEASE_WAIT_S = 60.0


def _place_hold(settings: Settings, payer: Holder, payee: Holder, amount: int, hold_seconds: int) -> dict[str, Any]:
    response = rest(settings, "POST", "/v1/transfers", {
        "request_id": uuid.uuid4().hex, "from_account_id": payer.account_id, "to_account_id": payee.account_id,
        "amount": amount, "currency": "EUR", "description": "deposit for the flat", "hold_seconds": hold_seconds,
    }, token=payer.token)
    assert response.status == 200, response.body
    assert response.body["status"] == "PENDING"
    return dict(response.body)


def _funded_pair(settings: Settings) -> tuple[Holder, Holder]:
    """A payer with AMOUNT_FUNDED EUR (its deposit email in) and a payee, both in EUR."""
    payer, payee = holder(settings, "EUR"), holder(settings, "EUR")
    deposit(settings, teller_token(settings), payer.account_id, AMOUNT_FUNDED, "EUR")
    mails_with(settings, payer.email, 2)  # verification, deposit
    return payer, payee


def _release_email(settings: Settings, payer: Holder, timeout_s: float) -> tuple[dict[str, Any], str]:
    """The payer's one HOLD_RELEASED email (their third: after verification and deposit)."""
    [newest, *_] = mails_with(settings, payer.email, 3, timeout_s)
    return newest, mailpit_text(settings, str(newest["ID"]))


def _hold_released_kinds(settings: Settings, customer: Holder) -> list[str]:
    response = rest(settings, "GET", "/v1/notifications?page_size=100", token=customer.token)
    assert response.status == 200, response.body
    return [n["kind"] for n in response.body.get("notifications", []) if n["kind"] == "HOLD_RELEASED"]


def test_a_voided_hold_emails_the_payer_once_and_the_payee_nothing(stack: Stack, settings: Settings) -> None:
    payer, payee = _funded_pair(settings)
    hold = _place_hold(settings, payer, payee, 1234, hold_seconds=3600)
    void = {"request_id": uuid.uuid4().hex}
    path = f"/v1/transfers/{hold['transfer_id']}:void"
    voided = rest(settings, "POST", path, void, token=payee.token)
    assert voided.status == 200, voided.body
    assert voided.body["status"] == "VOIDED"
    # A retry of the void returns the first answer and emits nothing new.
    assert rest(settings, "POST", path, void, token=payee.token).body == voided.body

    mail, text = _release_email(settings, payer, RELEASE_WAIT_S)
    assert mail["Subject"] == "A hold of 12.34 EUR was released"
    assert "voided by the payee" in text and f"Reference: {hold['transfer_id']}" in text
    # Recorded just after the send: the list may trail the inbox by a moment.
    assert until(lambda: _hold_released_kinds(settings, payer) or None, "the release listed") == ["HOLD_RELEASED"]
    # The payee's inbox holds their verification only; their list no release.
    assert [m["Subject"] for m in mails(settings, payee.email)] == ["Verify your email"]
    assert _hold_released_kinds(settings, payee) == []
    # The statement: the deposit, and nothing from the hold.
    [line] = statement_with(settings, payer.token, payer.account_id, 1)
    assert line["kind"] == "DEPOSIT"
    assert statement_with(settings, payee.token, payee.account_id, 0) == []


def test_a_lapsed_hold_emails_the_payer_once_when_it_is_released(stack: Stack, settings: Settings) -> None:
    payer, payee = _funded_pair(settings)
    hold = _place_hold(settings, payer, payee, 700, hold_seconds=60)
    assert age_holds(settings, [hold["transfer_id"]], 60) == 1  # expire_time is now: the worker releases it

    def expired() -> bool | None:
        response = rest(settings, "GET", f"/v1/transfers/{hold['transfer_id']}", token=payer.token)
        assert response.status == 200, response.body
        return True if response.body["status"] == "EXPIRED" else None
    until(expired, "the lapsed hold EXPIRED", RELEASE_WAIT_S, interval_s=0.5)

    mail, text = _release_email(settings, payer, RELEASE_WAIT_S)
    assert mail["Subject"] == "A hold of 7.00 EUR was released"
    assert "expired at " in text and f"Reference: {hold['transfer_id']}" in text
    # Recorded just after the send: the list may trail the inbox by a moment.
    assert until(lambda: _hold_released_kinds(settings, payer) or None, "the release listed") == ["HOLD_RELEASED"]
    assert [m["Subject"] for m in mails(settings, payee.email)] == ["Verify your email"]
    [line] = statement_with(settings, payer.token, payer.account_id, 1)
    assert line["kind"] == "DEPOSIT"

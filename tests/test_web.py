"""The customer web app (web/, issue #14) in a real browser: Debian's Chromium, driven by
Playwright for Python, against the pages Envoy serves at / and the real stack behind them.

The journey from registration (the code read from Mailpit) to a transfer between two
customers seen in both statements; a hold taken in part and one released from the payee's page;
the error paths (wrong code, insufficient funds, an ended
session); the idempotency key of the transfer form; the token refresh before expiry; the
Content-Security-Policy (every page here fails on a violation); labels and keyboard use.

Chromium comes from Debian (apt-get, when missing), never from a browser download. With
BANK_WEB_SCREENSHOTS=<folder>, the journey saves the README's screenshots there.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Request, Response, Route, expect, sync_playwright

from common.config import Settings
from devstack import install, web
from devstack.components import Paths
from devstack.stack import Stack
from tests.events_support import deposit, open_account, teller_token
from tests.secret_scan import REGISTRY
from tests.support import STRONG_PASSWORD, Customer, onboard, rest, unique_email, wait_for_code, wait_for_verification_code

# Without the background-networking flags Chromium tries Google's hosts at every start, and this
# machine's closed network refuses them (polyglot.md); no GPU here.
CHROMIUM_ARGS = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
# How long the browser waits for one thing the page should show (Playwright's auto-wait).
UI_TIMEOUT_MS = 15_000
# Statements are written from Kafka events: a committed transfer shows up within seconds.
STATEMENT_WAIT_S = 30.0
SCREENSHOTS = os.environ.get("BANK_WEB_SCREENSHOTS", "")
expect.set_options(timeout=UI_TIMEOUT_MS)


@pytest.fixture(scope="session")
def chromium(stack: Stack) -> str:
    """Debian's Chromium, apt-get installed when missing."""
    return install.debian_binary("chromium", "chromium", Paths(stack.paths.root).install_log("chromium"))


@pytest.fixture(scope="session")
def pages_fresh(stack: Stack, settings: Settings) -> str:
    """The pages Envoy serves are the ones web/src builds now (a stack started before the last
    change would serve an older build: the static server reads web/dist at each request)."""
    web.build(stack.paths.install_log("web"))
    base = f"http://127.0.0.1:{settings.envoy_port}"
    with urllib.request.urlopen(f"{base}/app/app.js", timeout=10) as served:
        assert served.read() == (web.DIST / "app.js").read_bytes(), "Envoy serves another build of web/: restart `web`"
    return base


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, headless=True, chromium_sandbox=False,
                                              args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Tab:
    """One browser tab on the app, with what it said on its console and what it sent."""

    page: Page
    context: BrowserContext
    base: str
    problems: list[str] = field(default_factory=list)
    api_requests: list[Request] = field(default_factory=list)
    api_statuses: list[tuple[str, int]] = field(default_factory=list)

    def open(self, route: str = "") -> None:
        """Loads the app at this route, or goes there inside the loaded app (a reload would forget
        the session, which lives in the page's memory only); the same route again: Refresh."""
        if not self.page.url.startswith(f"{self.base}/"):
            self.page.goto(f"{self.base}/#/{route}")
        elif self.page.evaluate("location.hash") == f"#/{route}":
            self.page.get_by_role("button", name="Refresh").click()
        else:
            self.page.evaluate("route => { location.hash = route }", f"#/{route}")

    def alert(self) -> Any:
        return self.page.get_by_role("alert")


@pytest.fixture
def new_tab(browser: Browser, pages_fresh: str) -> Iterator[Callable[[], Tab]]:
    """Tabs in fresh browser contexts (no shared cookies or storage). At the end, each must have
    logged no error: a Content-Security-Policy violation, a failed script, an uncaught exception."""
    tabs: list[Tab] = []

    def make() -> Tab:
        context = browser.new_context(locale="en-GB", timezone_id="UTC", viewport={"width": 1100, "height": 800})
        context.set_default_timeout(UI_TIMEOUT_MS)
        tab = Tab(context.new_page(), context, pages_fresh)
        tab.page.on("console", lambda m: tab.problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        tab.page.on("pageerror", lambda e: tab.problems.append(f"page error: {e}"))
        tab.page.on("request", lambda r: tab.api_requests.append(r) if "/v1/" in r.url else None)
        tab.page.on("response", _remember_secrets)
        tab.page.on("response", lambda r: tab.api_statuses.append((r.url, r.status)) if "/v1/" in r.url else None)
        tabs.append(tab)
        return tab

    yield make
    for tab in tabs:
        tab.context.close()
    # What Chromium logs for every refused request the tests cause on purpose; anything else fails.
    expected = re.compile(r"Failed to load resource: (the server responded with a status of (400|401)|net::ERR_CONNECTION_RESET)")
    problems = [p for tab in tabs for p in tab.problems if not expected.search(p)]
    assert not problems, "\n".join(problems)


def _remember_secrets(response: Response) -> None:
    """The tokens, codes and passwords the browser exchanged: the end of the session checks that
    no log holds them (tests/secret_scan.py), as for every other test's REST calls."""
    if "/v1/" not in response.url:
        return
    try:
        body = response.request.post_data
        REGISTRY.remember_fields(json.loads(body) if body else None)
        REGISTRY.remember_fields(response.json())
    except Exception:  # noqa: BLE001 (an empty or non-JSON body holds no secret)
        pass


# --- steps a customer takes in the browser ------------------------------------------------------

@dataclass
class WebCustomer:
    email: str
    username: str
    password: str
    customer_id: str


def register_in_browser(tab: Tab, settings: Settings, shots: str = "") -> WebCustomer:
    """Register, enter the emailed code, create credentials: signed in on the accounts page."""
    page = tab.page
    email, username = unique_email("web"), f"w{uuid.uuid4().hex[:12]}"
    tab.open("register")
    expect(page.get_by_role("heading", level=1)).to_have_text("Open your Simple Bank profile")
    page.get_by_label("Email address").fill(email)
    page.get_by_label("Full name").fill("Grace Hopper")
    _shot(page, shots, "register")
    with page.expect_response(lambda r: r.url.endswith("/v1/customers") and r.request.method == "POST") as registered:
        page.get_by_role("button", name="Register").click()
    customer_id = registered.value.json()["customer_id"]
    expect(page.get_by_role("heading", level=1)).to_have_text("Check your email")
    expect(page.get_by_role("status")).to_contain_text(email)
    code = wait_for_verification_code(settings, email)
    page.get_by_label("Verification code").fill(code)
    _shot(page, shots, "verify")
    page.get_by_role("button", name="Verify email").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Create your sign-in")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(STRONG_PASSWORD)
    REGISTRY.remember(STRONG_PASSWORD)
    page.get_by_role("button", name="Create sign-in").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Your accounts")
    return WebCustomer(email, username, STRONG_PASSWORD, customer_id)


def sign_in(tab: Tab, username: str, password: str = STRONG_PASSWORD) -> None:
    if tab.page.url != f"{tab.base}/#/signin":
        tab.open("signin")
    tab.page.get_by_label("Username").fill(username)
    tab.page.get_by_label("Password").fill(password)
    tab.page.get_by_role("button", name="Sign in").click()
    expect(tab.page.get_by_role("heading", level=1)).to_have_text("Your accounts")
    settled(tab)


def settled(tab: Tab) -> None:
    """The page's list has loaded (aria-busy, which screen readers read too, is false)."""
    expect(tab.page.locator("main section")).to_have_attribute("aria-busy", "false")


def open_account_in_browser(tab: Tab, currency: str) -> str:
    page = tab.page
    page.get_by_label("Currency").select_option(currency)
    with page.expect_response(lambda r: r.url.endswith("/v1/accounts") and r.request.method == "POST") as opened:
        page.get_by_role("button", name="Open account").click()
    account_id = str(opened.value.json()["account_id"])
    expect(page.get_by_role("status")).to_contain_text(f"Opened a {currency} account")
    expect(_account_row(page, account_id)).to_be_visible()
    return account_id


def _account_row(page: Page, account_id: str) -> Any:
    return page.locator(f'tr[data-account-id="{account_id}"]')


def send_money(tab: Tab, from_account: str, to_account: str, amount: str, description: str = "") -> None:
    """Fills the transfer form (submitting is the caller's: a click, a double click, Enter)."""
    page = tab.page
    if page.url != f"{tab.base}/#/transfer?from={from_account}":  # after a success the form is empty again
        tab.open(f"transfer?from={from_account}")
    expect(page.get_by_label("From account")).to_have_value(from_account)
    page.get_by_label("To account number").fill(to_account)
    page.get_by_label(re.compile(r"^Amount")).fill(amount)
    page.get_by_label("Description (optional)").fill(description)


def statement_lines(tab: Tab, account_id: str, wanted: int) -> list[str]:
    """The statement page's lines once it shows at least `wanted` of them (Refresh until then)."""
    page = tab.page
    tab.open(f"accounts/{account_id}")
    rows = page.locator("table.statement tbody tr")
    deadline = time.monotonic() + STATEMENT_WAIT_S
    while rows.count() < wanted and time.monotonic() < deadline:
        time.sleep(0.5)
        page.get_by_role("button", name="Refresh").click()
        settled(tab)
    assert rows.count() >= wanted, f"the statement of {account_id} shows {rows.count()} lines, not {wanted}"
    return [" | ".join(row.locator("td").all_inner_texts()) for row in rows.all()]


def _shot(page: Page, folder: str, name: str) -> None:
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)


def _wait_statement(settings: Settings, customer: Customer, account_id: str, lines: int) -> None:
    deadline = time.monotonic() + STATEMENT_WAIT_S
    while time.monotonic() < deadline:
        found = rest(settings, "GET", f"/v1/accounts/{account_id}/activity?page_size=500", token=customer.token)
        if found.status == 200 and len(found.body.get("activities", [])) >= lines:
            return
        time.sleep(0.3)
    raise AssertionError(f"the statement of {account_id} did not reach {lines} lines")


def _payer_and_payee(settings: Settings, currency: str, funds: int) -> tuple[Customer, str, Customer, str]:
    """A customer with an account holding `funds` (minor units), and another customer's account
    in the same currency, by REST: (payer, their account, payee, theirs)."""
    payer, payee = onboard(settings), onboard(settings)
    source, target = open_account(settings, payer, currency), open_account(settings, payee, currency)
    deposit(settings, teller_token(settings), source, funds, currency)
    return payer, source, payee, target


def _balance(settings: Settings, customer: Customer, account_id: str) -> str:
    found = rest(settings, "GET", f"/v1/accounts/{account_id}", token=customer.token)
    assert found.status == 200, found.body
    return str(found.body["balance"])


# --- the tests ------------------------------------------------------------------------------------

def test_the_page_is_served_with_a_strict_content_security_policy(pages_fresh: str) -> None:
    for path in ["/", "/app/app.js", "/app/app.css"]:
        with urllib.request.urlopen(f"{pages_fresh}{path}", timeout=10) as answer:
            policy = answer.headers["content-security-policy"] or ""
            assert answer.headers["x-content-type-options"] == "nosniff"
        directives = dict((d.strip().split(" ", 1) + [""])[:2] for d in policy.split(";") if d.strip())
        assert directives["default-src"] == "'none'"
        for name in ["script-src", "style-src", "connect-src", "img-src"]:
            assert directives[name] == "'self'", (name, policy)
        assert directives["frame-ancestors"] == "'none'"
        assert "unsafe" not in policy, policy


def test_journey_from_registration_to_a_transfer_seen_in_both_statements(new_tab: Callable[[], Tab],
                                                                         settings: Settings) -> None:
    shots = SCREENSHOTS
    ada_tab, bob_tab = new_tab(), new_tab()
    ada = register_in_browser(ada_tab, settings, shots)
    bob = register_in_browser(bob_tab, settings)
    ada_eur = open_account_in_browser(ada_tab, "EUR")
    bob_eur = open_account_in_browser(bob_tab, "EUR")
    bob_jpy = open_account_in_browser(bob_tab, "JPY")
    # Customers hold no cash of their own: a teller pays in 100.00 EUR and 1234 JPY.
    teller = teller_token(settings)
    deposit(settings, teller, ada_eur, 10000, "EUR")
    deposit(settings, teller, bob_jpy, 1234, "JPY")

    ada_tab.open("accounts")
    expect(_account_row(ada_tab.page, ada_eur).locator(".balance")).to_have_text("100.00 EUR")
    _shot(ada_tab.page, shots, "accounts")
    bob_tab.open("accounts")
    expect(_account_row(bob_tab.page, bob_jpy).locator(".balance")).to_have_text("1234 JPY")
    expect(_account_row(bob_tab.page, bob_eur).locator(".balance")).to_have_text("0.00 EUR")

    send_money(ada_tab, ada_eur, bob_eur, "12.34", "Lunch")
    _shot(ada_tab.page, shots, "send-money")
    with ada_tab.page.expect_response(lambda r: r.url.endswith("/v1/transfers")) as sent:
        ada_tab.page.get_by_role("button", name="Send").click()
    transfer_id = sent.value.json()["transfer_id"]
    expect(ada_tab.page.get_by_role("status")).to_contain_text(f"Sent 12.34 EUR to {bob_eur}")
    expect(ada_tab.page.get_by_role("status")).to_contain_text(transfer_id)

    # Both statements: the payer's line is -12.34 EUR, the payee's +12.34 EUR, the same transfer.
    ada_lines = statement_lines(ada_tab, ada_eur, 2)
    assert "Lunch" in ada_lines[0] and bob_eur in ada_lines[0] and "-12.34 EUR | 87.66 EUR" in ada_lines[0], ada_lines
    assert "100.00 EUR | 100.00 EUR" in ada_lines[1], ada_lines
    assert ada_tab.page.locator(f'tr[data-transfer-id="{transfer_id}"]').count() == 1
    expect(ada_tab.page.locator(".summary .balance")).to_have_text("87.66 EUR")
    _shot(ada_tab.page, shots, "statement")
    bob_lines = statement_lines(bob_tab, bob_eur, 1)
    assert len(bob_lines) == 1 and "Lunch" in bob_lines[0] and ada_eur in bob_lines[0], bob_lines
    assert "12.34 EUR | 12.34 EUR" in bob_lines[0] and "-12.34" not in bob_lines[0], bob_lines
    assert bob_tab.page.locator(f'tr[data-transfer-id="{transfer_id}"]').count() == 1

    # The emails the bank sent Bob: the verification and the money received.
    bob_tab.open("notifications")
    table = bob_tab.page.locator("table.notifications")
    deadline = time.monotonic() + STATEMENT_WAIT_S
    while "Money received" not in (table.inner_text() if table.count() else "") and time.monotonic() < deadline:
        time.sleep(0.5)
        bob_tab.page.get_by_role("button", name="Refresh").click()
        settled(bob_tab)
    expect(table).to_contain_text("Money received")
    expect(table).to_contain_text("Email verification")
    expect(table).to_contain_text(bob.email)
    _shot(bob_tab.page, shots, "notifications")

    # No token anywhere but the page's memory: no web storage, no cookie.
    for tab in (ada_tab, bob_tab):
        assert tab.page.evaluate("localStorage.length + sessionStorage.length") == 0
        assert tab.context.cookies() == []

    # Signing out revokes the session at the bank: its token stops working at once.
    token = _bearer_of_last_api_request(ada_tab)
    with ada_tab.page.expect_response(lambda r: "/v1/sessions/" in r.url and r.request.method == "DELETE") as ended:
        ada_tab.page.get_by_role("button", name="Sign out").click()
    assert ended.value.status == 200
    expect(ada_tab.page.get_by_role("heading", level=1)).to_have_text("Sign in")
    assert rest(settings, "GET", "/v1/accounts", token=token).status == 401
    _shot(ada_tab.page, shots, "signin")
    assert ada.customer_id != bob.customer_id


def _place_hold(settings: Settings, payer: Customer, source: str, target: str, amount: int, description: str) -> Any:
    placed = rest(settings, "POST", "/v1/transfers", {
        "request_id": uuid.uuid4().hex, "from_account_id": source, "to_account_id": target, "amount": amount,
        "currency": "EUR", "description": description, "hold_seconds": 3600}, token=payer.token)
    assert placed.status == 200 and placed.body["status"] == "PENDING", placed.body
    return placed.body


def _as_shown(rfc3339: str) -> str:
    """A time as the page shows it (en-GB, the browser context's UTC): "7 Jan 2026, 09:05"."""
    moment = datetime.fromisoformat(rfc3339.replace("Z", "+00:00"))
    return f"{moment.day} {moment:%b %Y, %H:%M}"


def test_the_payee_takes_part_of_a_hold_and_releases_another_and_both_pages_follow(
        new_tab: Callable[[], Tab], settings: Settings) -> None:
    alice, alice_eur, bob, bob_eur = _payer_and_payee(settings, "EUR", 10000)
    rent = _place_hold(settings, alice, alice_eur, bob_eur, 3000, "Rent deposit")
    # The other hold from the transfer form, "Hold for" 90 minutes.
    alice_tab = new_tab()
    sign_in(alice_tab, alice.username)
    send_money(alice_tab, alice_eur, bob_eur, "10.00", "Key deposit")
    alice_tab.page.get_by_label("Hold for (minutes, optional)").fill("90")
    with alice_tab.page.expect_response(lambda r: r.url.endswith("/v1/transfers")) as placed:
        alice_tab.page.get_by_role("button", name="Send").click()
    keys = placed.value.json()
    assert (keys["status"], keys["held_amount"], json.loads(placed.value.request.post_data or "{}")["hold_seconds"]) \
        == ("PENDING", "1000", 5400), keys
    expect(alice_tab.page.get_by_role("status")).to_contain_text(
        f"Held 10.00 EUR for {bob_eur} until {_as_shown(keys['expire_time'])}")

    # The payer: the balance is whole, the available balance is lower by both holds, listed with payee and expiry.
    alice_tab.open("accounts")
    expect(_account_row(alice_tab.page, alice_eur).locator("td.money").nth(1)).to_have_text("60.00 EUR")
    alice_tab.open(f"accounts/{alice_eur}")
    expect(alice_tab.page.locator(".summary .balance")).to_have_text("100.00 EUR")
    expect(alice_tab.page.locator(".summary .available")).to_have_text("60.00 EUR")
    outgoing = alice_tab.page.locator(f'table.holds.outgoing tr[data-transfer-id="{rent["transfer_id"]}"]')
    for shown in (bob_eur, "Rent deposit", "30.00 EUR", _as_shown(rent["expire_time"])):
        expect(outgoing).to_contain_text(shown)
    expect(alice_tab.page.locator("table.holds.outgoing tbody tr")).to_have_count(2)
    expect(alice_tab.page.locator("table.holds.incoming")).to_have_count(0)  # no "Take payment" for the payer
    _shot(alice_tab.page, SCREENSHOTS, "holds-payer")

    # The payee: both holds listed, the amount field filled with the held amount; the balance not moved yet.
    bob_tab = new_tab()
    sign_in(bob_tab, bob.username)
    bob_tab.open(f"accounts/{bob_eur}")
    page = bob_tab.page
    expect(page.locator(".summary .balance")).to_have_text("0.00 EUR")
    expect(page.locator(".summary .available")).to_have_text("0.00 EUR")
    incoming = page.locator(f'table.holds.incoming tr[data-transfer-id="{rent["transfer_id"]}"]')
    expect(incoming).to_contain_text(alice_eur)
    amount = incoming.get_by_label(re.compile(r"^Amount to take"))
    expect(amount).to_have_value("30.00")
    assert page.locator("table.statement").count() == 0  # a hold makes no statement line

    # Bob takes 20.00 of the 30.00; the bank posts it, but the answer is lost; "Take payment" again
    # sends the same request_id, and the bank answers with the first post.
    bodies: list[dict[str, Any]] = []

    def lose_first_answer(route: Route) -> None:
        bodies.append(json.loads(route.request.post_data or "{}"))
        if len(bodies) == 1:
            route.fetch()
            route.abort("connectionreset")
        else:
            route.continue_()

    page.route(re.compile(r".*/v1/transfers/[^/]+:post$"), lose_first_answer)
    amount.fill("20.00")
    _shot(page, SCREENSHOTS, "holds")
    incoming.get_by_role("button", name="Take payment").click()
    expect(incoming.get_by_role("alert")).to_contain_text("could not be reached")
    incoming.get_by_role("button", name="Take payment").click()
    expect(page.get_by_role("status")).to_contain_text("Took 20.00 EUR")
    expect(page.get_by_role("status")).to_contain_text("the other 10.00 EUR is released")
    assert len(bodies) == 2 and bodies[0] == bodies[1] and bodies[0]["amount"] == "2000", bodies
    expect(page.locator(".summary .balance")).to_have_text("20.00 EUR")
    expect(page.locator(".summary .available")).to_have_text("20.00 EUR")
    expect(incoming).to_have_count(0)

    # Bob lets the other hold go.
    other = page.locator(f'table.holds.incoming tr[data-transfer-id="{keys["transfer_id"]}"]')
    with page.expect_response(lambda r: r.url.endswith(":void")) as voided:
        other.get_by_role("button", name="Release").click()
    assert voided.value.status == 200 and voided.value.json()["status"] == "VOIDED"
    expect(page.get_by_role("status")).to_contain_text("Released hold")
    expect(page.get_by_text("No money is held to or from this account.")).to_be_visible()

    # The statements: one line each, for the 20.00 that moved, at the post.
    bob_lines = statement_lines(bob_tab, bob_eur, 1)
    assert len(bob_lines) == 1 and "Rent deposit" in bob_lines[0] and alice_eur in bob_lines[0], bob_lines
    assert "20.00 EUR | 20.00 EUR" in bob_lines[0], bob_lines
    alice_lines = statement_lines(alice_tab, alice_eur, 2)
    assert "-20.00 EUR | 80.00 EUR" in alice_lines[0] and len(alice_lines) == 2, alice_lines
    expect(alice_tab.page.locator(".summary .balance")).to_have_text("80.00 EUR")
    expect(alice_tab.page.locator(".summary .available")).to_have_text("80.00 EUR")
    expect(alice_tab.page.get_by_text("No money is held to or from this account.")).to_be_visible()
    moved = rest(settings, "GET", f"/v1/transfers/{rent['transfer_id']}", token=alice.token).body
    assert (moved["status"], moved["amount"], moved["held_amount"]) == ("COMPLETED", "2000", "3000"), moved


def _bearer_of_last_api_request(tab: Tab) -> str:
    for request in reversed(tab.api_requests):
        header = request.headers.get("authorization", "")
        if header.startswith("Bearer "):
            return header.removeprefix("Bearer ")
    raise AssertionError("the page sent no authorized request")


def test_statement_pages_through_older_and_newer_lines(new_tab: Callable[[], Tab], settings: Settings) -> None:
    customer = onboard(settings)
    account_id = open_account(settings, customer, "GBP")
    teller = teller_token(settings)
    for pence in range(1, 13):  # 12 movements: a page of 10 and a page of 2
        deposit(settings, teller, account_id, pence * 100, "GBP")
    _wait_statement(settings, customer, account_id, 12)
    tab = new_tab()
    sign_in(tab, customer.username)
    lines = statement_lines(tab, account_id, 10)
    assert len(lines) == 10 and "12.00 GBP | 78.00 GBP" in lines[0], lines  # newest first: 1+...+12 = 78
    expect(tab.page.get_by_role("button", name="Newer")).to_be_disabled()
    tab.page.get_by_role("button", name="Older").click()
    expect(tab.page.locator("table.statement caption")).to_have_text("Page 2, newest first")
    expect(tab.page.locator("table.statement tbody tr")).to_have_count(2)
    older = [" | ".join(r.locator("td").all_inner_texts()) for r in tab.page.locator("table.statement tbody tr").all()]
    assert len(older) == 2 and "1.00 GBP | 1.00 GBP" in older[1], older
    expect(tab.page.get_by_role("button", name="Older")).to_be_disabled()
    tab.page.get_by_role("button", name="Newer").click()
    expect(tab.page.locator("table.statement caption")).to_have_text("Page 1, newest first")
    expect(tab.page.locator("table.statement tbody tr")).to_have_count(10)


def test_a_wrong_verification_code_shows_the_apis_message(new_tab: Callable[[], Tab], settings: Settings) -> None:
    tab = new_tab()
    page = tab.page
    email = unique_email("webcode")
    tab.open("register")
    page.get_by_label("Email address").fill(email)
    page.get_by_label("Full name").fill("Wrong Code")
    page.get_by_role("button", name="Register").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Check your email")
    assert page.evaluate(LOW_CONTRAST) == []  # "Send a new code" among them
    code = wait_for_verification_code(settings, email)
    wrong = f"{(int(code) + 1) % 10 ** len(code):0{len(code)}d}"
    page.get_by_label("Verification code").fill(wrong)
    with page.expect_response(lambda r: ":verifyEmail" in r.url) as refused:
        page.get_by_role("button", name="Verify email").click()
    assert refused.value.status == 400
    body = refused.value.json()
    expect(tab.alert()).to_contain_text(body["message"])
    expect(tab.alert()).to_contain_text("INVALID_CODE")
    expect(page.get_by_role("heading", level=1)).to_have_text("Check your email")
    # A new code by email ("Send a new code"); it verifies, after the wrong one.
    page.get_by_role("button", name="Send a new code").click()
    expect(page.get_by_role("status").filter(has_text="A new code is on its way")).to_be_visible()
    new_code = wait_for_code(settings, email, "Verification code", 2)
    page.get_by_label("Verification code").fill(new_code)
    page.get_by_role("button", name="Verify email").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Create your sign-in")


def test_insufficient_funds_and_a_bad_amount_are_shown_and_move_nothing(new_tab: Callable[[], Tab],
                                                                         settings: Settings) -> None:
    payer, source, payee, target = _payer_and_payee(settings, "EUR", 500)
    tab = new_tab()
    sign_in(tab, payer.username)
    page = tab.page
    expect(_account_row(page, source).locator(".balance")).to_have_text("5.00 EUR")

    # An amount the currency cannot hold is refused before any request.
    send_money(tab, source, target, "1.234")
    sent_before = len(tab.api_requests)
    page.get_by_role("button", name="Send").click()
    expect(tab.alert()).to_contain_text("EUR has 2 decimal places at most")
    assert not [r for r in tab.api_requests[sent_before:] if r.url.endswith("/v1/transfers")]

    page.get_by_label(re.compile(r"^Amount")).fill("10.00")
    with page.expect_response(lambda r: r.url.endswith("/v1/transfers")) as refused:
        page.get_by_role("button", name="Send").click()
    assert refused.value.status == 400
    expect(tab.alert()).to_contain_text(refused.value.json()["message"])
    expect(tab.alert()).to_contain_text("INSUFFICIENT_FUNDS")
    assert _balance(settings, payer, source) == "500"
    assert _balance(settings, payee, target) == "0"

    # A JPY account takes whole yen only.
    yen = open_account(settings, payer, "JPY")
    send_money(tab, yen, target, "12.5")
    page.get_by_role("button", name="Send").click()
    expect(tab.alert()).to_contain_text("JPY has no decimal places")


def test_a_retry_or_a_double_click_moves_money_once(new_tab: Callable[[], Tab], settings: Settings) -> None:
    payer, source, _, target = _payer_and_payee(settings, "USD", 10000)
    tab = new_tab()
    sign_in(tab, payer.username)
    page = tab.page

    # The bank carries out the first transfer, but its answer is lost on the way back.
    bodies: list[dict[str, Any]] = []

    def lose_first_answer(route: Route) -> None:
        bodies.append(json.loads(route.request.post_data or "{}"))
        if len(bodies) == 1:
            route.fetch()  # reaches the bank...
            route.abort("connectionreset")  # ...and the page never hears back
        else:
            route.continue_()

    page.route("**/v1/transfers", lose_first_answer)
    send_money(tab, source, target, "25.00", "retried")
    page.get_by_role("button", name="Send").click()
    expect(tab.alert()).to_contain_text("could not be reached")
    assert _balance(settings, payer, source) == "7500"  # it did move
    page.get_by_role("button", name="Send").click()  # the person tries again
    expect(page.get_by_role("status")).to_contain_text("Sent 25.00 USD")
    assert len(bodies) == 2 and bodies[0]["request_id"] == bodies[1]["request_id"], bodies
    assert _balance(settings, payer, source) == "7500"  # and only once
    page.unroute("**/v1/transfers")

    # A double click on a new submission: one request, one movement.
    send_money(tab, source, target, "1.00", "double")
    before = len([r for r in tab.api_requests if r.url.endswith("/v1/transfers")])
    page.get_by_role("button", name="Send").dblclick()
    expect(page.get_by_role("status")).to_contain_text("Sent 1.00 USD")
    posted = [r for r in tab.api_requests if r.url.endswith("/v1/transfers")][before:]
    assert len({json.loads(r.post_data or "{}")["request_id"] for r in posted}) == 1
    assert posted and json.loads(posted[0].post_data or "{}")["request_id"] != bodies[0]["request_id"]
    assert _balance(settings, payer, source) == "7400"
    transfers = rest(settings, "GET", f"/v1/accounts/{source}/transfers", token=payer.token).body["transfers"]
    assert sorted(t["amount"] for t in transfers if t["from_account_id"] == source) == ["100", "2500"]


def test_an_ended_session_sends_the_customer_to_sign_in_with_the_apis_message(new_tab: Callable[[], Tab],
                                                                               settings: Settings) -> None:
    customer = onboard(settings)
    tab = new_tab()
    sign_in(tab, customer.username)
    # The customer ends the browser's session from elsewhere (their other session, over REST).
    sessions = rest(settings, "GET", f"/v1/customers/{customer.customer_id}/sessions", token=customer.token).body["sessions"]
    [browser_session] = [s for s in sessions if not s["current"]]
    assert rest(settings, "DELETE", f"/v1/sessions/{browser_session['session_id']}", token=customer.token).status == 200
    page = tab.page
    with page.expect_response(lambda r: r.url.endswith("/v1/sessions:refresh")) as refresh:
        page.get_by_role("link", name="Notifications").click()
    assert refresh.value.status == 401
    message = refresh.value.json()["message"]
    expect(page.get_by_role("heading", level=1)).to_have_text("Sign in")
    expect(tab.alert()).to_contain_text(f"Your session has ended: {message}")
    # Signing in again works.
    page.get_by_label("Username").fill(customer.username)
    page.get_by_label("Password").fill(customer.password)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Your accounts")


def test_the_access_token_is_refreshed_before_it_expires(new_tab: Callable[[], Tab], settings: Settings) -> None:
    customer = onboard(settings)
    tab = new_tab()
    page = tab.page
    page.clock.install()  # the page's clock, moved forward below; the bank's is the real one
    tab.open("signin")
    page.get_by_label("Username").fill(customer.username)
    page.get_by_label("Password").fill(customer.password)
    with page.expect_response(lambda r: r.url.endswith("/v1/sessions")) as signed_in:
        page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Your accounts")
    first = signed_in.value.json()
    life_s = (_time(first["access_token_expire_time"]) - time.time())
    assert life_s > 120, first["access_token_expire_time"]
    # Halfway through the token's life nothing is renewed yet; just before its expiry (as the
    # page's clock has it) it is, unasked. fast_forward jumps, as a laptop waking from sleep does.
    page.clock.fast_forward(int(life_s / 2 * 1000))
    page.wait_for_timeout(500)
    assert not [url for url, _ in tab.api_statuses if url.endswith("/v1/sessions:refresh")]
    with page.expect_response(lambda r: r.url.endswith("/v1/sessions:refresh")) as refreshed:
        page.clock.fast_forward(int((life_s / 2 - 5) * 1000))
    assert refreshed.value.status == 200
    renewed = refreshed.value.json()["access_token"]
    assert renewed != first["access_token"]
    page.get_by_role("link", name="Notifications").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Notifications")
    expect(page.locator("table.notifications")).to_contain_text("Email verification")
    assert _bearer_of_last_api_request(tab) == renewed
    assert [status for _, status in tab.api_statuses if status == 401] == []


def _time(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


# The contrast of each enabled control's and label's text with what is behind it (WCAG 2's
# formula: 4.5:1 at least for normal text). The background is the nearest opaque one up the tree.
LOW_CONTRAST = """() => {
  const rgb = (c) => (c.match(/[\\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => [r, g, b].map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; })
    .reduce((sum, v, i) => sum + v * [0.2126, 0.7152, 0.0722][i], 0);
  const background = (e) => {
    for (; e; e = e.parentElement) { const c = rgb(getComputedStyle(e).backgroundColor); if (c.length === 3 || c[3] > 0) return c; }
    return [255, 255, 255];
  };
  return [...document.querySelectorAll('a[href], button:not(:disabled), label, h1, td, th, p')]
    .filter((e) => e.offsetParent !== null && (e.textContent || '').trim() && !e.closest('.visually-hidden, .skip'))
    .map((e) => { const [a, b] = [lum(rgb(getComputedStyle(e).color)), lum(background(e))];
                  return [e.outerHTML.slice(0, 80), (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05)]; })
    .filter(([, ratio]) => ratio < 4.5);
}"""


def test_accessibility_basics_labels_and_keyboard(new_tab: Callable[[], Tab], settings: Settings) -> None:
    customer = onboard(settings)
    open_account(settings, customer, "EUR")
    tab = new_tab()
    page = tab.page
    unlabelled = """() => [...document.querySelectorAll('input, select, textarea, button, a[href]')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.getAttribute('aria-labelledby')
                     && !(e.textContent || '').trim())
        .map(e => e.outerHTML)"""
    for route in ["signin", "register", "forgot"]:
        tab.open(route)
        expect(page.get_by_role("heading", level=1)).to_be_focused()
        assert page.evaluate(unlabelled) == [], route
        assert page.evaluate(LOW_CONTRAST) == [], route
        assert page.evaluate("document.documentElement.lang") == "en"

    # Signing in with the keyboard alone: Tab to each field, Enter submits.
    tab.open("signin")
    expect(page.get_by_role("heading", level=1)).to_be_focused()
    page.keyboard.press("Tab")
    expect(page.get_by_label("Username")).to_be_focused()
    page.keyboard.type(customer.username)
    page.keyboard.press("Tab")
    expect(page.get_by_label("Password")).to_be_focused()
    page.keyboard.type(customer.password)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", level=1)).to_have_text("Your accounts")
    expect(page.get_by_role("heading", level=1)).to_be_focused()
    expect(page.locator("table.accounts tbody tr")).to_have_count(1)
    assert page.evaluate(unlabelled) == []
    assert page.evaluate(LOW_CONTRAST) == []

    # The main navigation by keyboard: from the page's start, Tab reaches "Send money", Enter follows it.
    page.keyboard.press("Shift+Tab")
    for _ in range(10):
        if page.evaluate("document.activeElement.textContent") == "Send money":
            break
        page.keyboard.press("Shift+Tab")
    expect(page.get_by_role("navigation", name="Main").get_by_role("link", name="Send money")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", level=1)).to_have_text("Send money")
    expect(page.get_by_role("heading", level=1)).to_be_focused()
    assert page.evaluate(unlabelled) == []
    # An error is announced (role=alert) and names the field's problem. Send is disabled until
    # the accounts are loaded, and Enter does not submit a form whose button is disabled.
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    page.get_by_label(re.compile(r"^Amount")).focus()
    page.keyboard.type("abc")
    page.keyboard.press("Enter")
    expect(tab.alert()).to_contain_text("Enter an amount")


def test_a_forgotten_password_is_reset_with_the_emailed_code(new_tab: Callable[[], Tab], settings: Settings) -> None:
    customer = onboard(settings)
    tab = new_tab()
    page = tab.page
    tab.open("signin")
    page.get_by_role("link", name="Forgot your password?").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Forgot your password?")
    page.get_by_label("Email address").fill(customer.email)
    page.get_by_role("button", name="Send reset code").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Set a new password")
    expect(page.get_by_label("Email address")).to_have_value(customer.email)
    code = wait_for_code(settings, customer.email, "Password reset code", 1, 30.0, customer.customer_id)
    new_password = f"{STRONG_PASSWORD}-renewed"
    REGISTRY.remember(new_password)
    # A wrong code: the API's message, and the password is unchanged.
    page.get_by_label("Reset code").fill(f"{(int(code) + 1) % 10 ** len(code):0{len(code)}d}")
    page.get_by_label("New password").fill(new_password)
    with page.expect_response(lambda r: r.url.endswith(":resetPassword")) as refused:
        page.get_by_role("button", name="Set new password").click()
    assert refused.value.status == 400
    expect(tab.alert()).to_contain_text(refused.value.json()["message"])
    expect(tab.alert()).to_contain_text("INVALID_CODE")
    _shot(page, SCREENSHOTS, "reset-password")
    page.get_by_label("Reset code").fill(code)
    page.get_by_role("button", name="Set new password").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Sign in")
    expect(page.get_by_role("status")).to_contain_text("Your password is changed")
    # Every earlier session ended; the new password signs in, the old one does not.
    assert rest(settings, "GET", "/v1/accounts", token=customer.token).status == 401
    assert rest(settings, "POST", "/v1/sessions", {"username": customer.username, "password": customer.password}).status == 401
    sign_in(tab, customer.username, new_password)

"""Overload at a small scale: real transfers committed through Envoy faster than svc_notify can
email them (16 clients at once: the ledger commits several hundred a second, two emails each),
so a backlog builds up in Kafka. Once the load stops, the backlog drains: every committed
movement has exactly one statement line per side and one email per party, and Mailpit was
never handed a second copy of any email (it counts, and drops, a message whose Message-ID it
already holds). How fast it drains is measured in perf/ (make bench-sustained), never here."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

from common.config import Settings
from devstack.stack import Stack
from tests.events_support import (
    Holder,
    check_converged,
    funded_people,
    mailpit_stats,
    service_metric,
)
from tests.support import rest, until

PEOPLE = 6
FUNDS = 1_000_000
TRANSFERS = 400
CLIENTS = 16


class LagWatch:
    """The highest consumer lag svc_notify's transfer group reported while it runs."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.highest = 0.0

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            lag = service_metric(self._settings, "notify", "consumer_lag_records", group="svc_notify.transfer")
            self.highest = max(self.highest, lag)

    def __enter__(self) -> LagWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _transfer(settings: Settings, people: list[Holder], n: int) -> bool:
    source, target = people[n % PEOPLE], people[(n * 5 + 1) % PEOPLE]
    if source is target:
        target = people[(n + 1) % PEOPLE]
    response = rest(settings, "POST", "/v1/transfers", {
        "request_id": uuid.uuid4().hex, "from_account_id": source.account_id, "to_account_id": target.account_id,
        "amount": 1 + n % 5, "currency": "USD"}, token=source.token)
    return response.status == 200


def test_a_burst_above_capacity_drains_with_nothing_lost_and_nothing_sent_twice(stack: Stack,
                                                                               settings: Settings) -> None:
    people = funded_people(settings, PEOPLE, FUNDS)
    check_converged(settings, people, PEOPLE * FUNDS)  # the deposits are in: the burst starts from quiet
    ignored_before = mailpit_stats(settings)["SMTPIgnored"]

    with LagWatch(settings) as watch:
        with ThreadPoolExecutor(CLIENTS) as clients:
            committed = sum(clients.map(lambda n: _transfer(settings, people, n), range(TRANSFERS)))
        assert committed > TRANSFERS * 0.9, f"only {committed} of {TRANSFERS} transfers committed"
        # The load has stopped: the backlog must go back to nothing, by itself.
        until(lambda: True if service_metric(settings, "notify", "consumer_lag_records",
                                             group="svc_notify.transfer") == 0 else None,
              "svc_notify's backlog drained", timeout_s=120, interval_s=0.2)

    assert watch.highest > 0, "the burst never outran svc_notify: no overload was made"
    check_converged(settings, people, PEOPLE * FUNDS)
    assert mailpit_stats(settings)["SMTPIgnored"] == ignored_before, "an email was sent twice"

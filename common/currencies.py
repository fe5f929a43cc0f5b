"""The currencies the bank keeps accounts in (API.md: at least USD, EUR, GBP, JPY), the one list.

svc_account opens accounts in these only; svc_transfer labels its metrics with them. The
ledger's cash accounts are made for exactly these by svc_transfer/migrations/0001 (SQL cannot
import this; tests/unit/test_currencies.py checks the two agree): a new currency needs a
migration that adds its cash account, then its code here.
"""

from __future__ import annotations

SUPPORTED_CURRENCIES = frozenset({"USD", "EUR", "GBP", "JPY"})

"""Figures a test measured (a failover window, answers by status, a model test's steps), kept
for the end of the run: conftest prints them in pytest's terminal summary, so a CI log shows
them without `-s`. `report` also prints the line at once (seen with `-s`)."""

from __future__ import annotations

import sys

LINES: list[str] = []


def report(text: str) -> None:
    """Keep `text` (one or more lines) for the summary and print it now."""
    LINES.extend(text.strip("\n").splitlines())
    print(text, file=sys.stderr)

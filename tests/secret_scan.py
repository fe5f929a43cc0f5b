"""No secret is ever logged (OWASP API Security Top 10 2023, API8 misconfiguration; the bank's
own rule): every secret a test sends or receives (passwords, verification codes, enrollment,
access and refresh tokens, the service token) is remembered here, and at the end of the pytest
session (tests/conftest.py) the part of every log under the stack's logs folder written during
the session is searched for them, and for anything shaped like a PASETO token or a private key,
whoever created it. A finding fails the run.

Cost, per log: a split into words (str.translate, in C) whose 43-character and 6-digit words
are looked up in sets, one regular-expression pass per shape (each starts with a literal), and
one substring search per distinct password-like secret (a handful: the tests reuse few
passwords). About 45 MB/s on the project's machine.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Fields of the bank's messages that hold a secret (API.md): in requests or in responses.
SECRET_FIELDS = frozenset({"password", "new_password", "current_password", "enrollment_token", "access_token",
                           "refresh_token"})
# Of those, the ones that hold a password (any shape), not a token.
PASSWORD_FIELDS = frozenset({"password", "new_password", "current_password"})
# 256-bit tokens from secrets.token_urlsafe(32): enrollment and refresh tokens, the service token.
URLSAFE_TOKEN = re.compile(r"^[A-Za-z0-9_-]{43}$")
URLSAFE_CHARACTERS = frozenset(string.ascii_letters + string.digits + "_-")
# Secrets shorter or plainer than this are not searched for: a wrong password such as "short" or
# "aaaaaaaaaaaa" in a test would match innocent log text. The bank refuses such passwords anyway.
PASSWORD_LENGTH_MIN = 10
PASSWORD_DISTINCT_CHARACTERS_MIN = 5
# Anything shaped like these is a finding, whoever made it.
SHAPES = {
    "a PASETO token": re.compile(r"v[1-4]\.(?:public|local)\.[A-Za-z0-9_-]{20,}"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
}
# A verification or password reset code is six digits: alone it would match innocent numbers, so it counts only on
# a line that also names its customer (how a leaked code would show: with whom it belongs to).
CODE_LENGTH = 6


class _OnlyKeep(dict[int, int]):
    """A str.translate table turning every character outside keep into a space."""

    def __init__(self, keep: Iterable[str]) -> None:
        super().__init__()
        self._keep = frozenset(keep)

    def __missing__(self, code: int) -> int:
        self[code] = code if chr(code) in self._keep else ord(" ")
        return self[code]


_URLSAFE_WORDS = _OnlyKeep(URLSAFE_CHARACTERS)
_DIGIT_WORDS = _OnlyKeep(string.digits)


@dataclass
class Registry:
    tokens: set[str] = field(default_factory=set)  # URLSAFE_TOKEN-shaped secrets
    passwords: set[str] = field(default_factory=set)  # any other secret
    codes: dict[str, set[str]] = field(default_factory=dict)  # code -> its customer's id and email

    def remember(self, secret: str, *, password: bool = True) -> None:
        """password=False: a token field, whose secrets all have a token's shape; anything else
        in one ("not-a-token", a fuzzed value) is a test's made-up input, not a secret."""
        if URLSAFE_TOKEN.match(secret):
            self.tokens.add(secret)
        elif secret.startswith(("v2.", "v3.", "v4.")):
            pass  # every PASETO token is found by its shape
        elif password and len(secret) >= PASSWORD_LENGTH_MIN and len(set(secret)) >= PASSWORD_DISTINCT_CHARACTERS_MIN:
            self.passwords.add(secret)

    def remember_code(self, code: str, *owner: str) -> None:
        self.codes.setdefault(code, set()).update(o for o in owner if o)

    def remember_fields(self, message: Any) -> None:
        """Every secret field in a request or response body (JSON-like), at any depth."""
        if isinstance(message, Mapping):
            for key, value in message.items():
                if key in SECRET_FIELDS and isinstance(value, str):
                    self.remember(value, password=key in PASSWORD_FIELDS)
                else:
                    self.remember_fields(value)
        elif isinstance(message, list):
            for item in message:
                self.remember_fields(item)


REGISTRY = Registry()


@dataclass(frozen=True)
class Finding:
    log: Path
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.log}:{self.line}: {self.what}"


def log_sizes(logs: Path) -> dict[Path, int]:
    """Where each log ends now: the scan reads only what is written after."""
    return {path: path.stat().st_size for path in sorted(logs.glob("*.log"))}


def _line_of(text: str, position: int) -> tuple[int, str]:
    start = text.rfind("\n", 0, position) + 1
    end = text.find("\n", position)
    return text.count("\n", 0, position) + 1, text[start: end if end != -1 else len(text)]


def _positions(text: str, secret: str) -> Iterator[int]:
    position = text.find(secret)
    while position != -1:
        yield position
        position = text.find(secret, position + 1)


def scan_text(text: str, registry: Registry) -> list[tuple[int, str]]:
    """(line number, what) for each secret found in text."""
    found: list[tuple[int, str]] = []
    for name, shape in SHAPES.items():
        found += [(_line_of(text, m.start())[0], name) for m in shape.finditer(text)]
    if registry.tokens:
        words = {w for w in text.translate(_URLSAFE_WORDS).split() if len(w) == 43}
        found += [(_line_of(text, at)[0], "an enrollment, refresh or service token")
                  for token in words & registry.tokens for at in _positions(text, token)]
    for secret in registry.passwords:
        found += [(_line_of(text, at)[0], "a password") for at in _positions(text, secret)]
    if registry.codes:
        numbers = {w for w in text.translate(_DIGIT_WORDS).split() if len(w) == CODE_LENGTH}
        for code in numbers & registry.codes.keys():
            for at in _positions(text, code):
                number, line = _line_of(text, at)
                if any(owner in line for owner in registry.codes[code]):
                    found.append((number, "a verification or reset code, next to its customer"))
    return sorted(set(found))


def scan(logs: Path, since: Mapping[Path, int], registry: Registry) -> list[Finding]:
    """Every finding in what the logs under logs gained after since (a log now shorter than
    recorded was started anew and is read whole)."""
    findings: list[Finding] = []
    for path in sorted(logs.glob("*.log")):
        start = since.get(path, 0)
        with open(path, "rb") as log:
            if log.seek(0, 2) < start:
                start = 0
            log.seek(start)
            text = log.read().decode("utf-8", "replace")
        found = scan_text(text, registry)
        if found and start:  # line numbers in the whole file, counted only when reported
            with open(path, "rb") as log:
                first_line = log.read(start).count(b"\n") + 1
        else:
            first_line = 1
        findings += [Finding(path, first_line + number - 1, what) for number, what in found]
    return findings


def report(findings: Iterable[Finding], limit: int = 20) -> str:
    listed = list(findings)
    lines = [f"secrets in the stack's logs ({len(listed)} findings; the secret itself is not shown):"]
    lines += [f"  {finding}" for finding in listed[:limit]]
    if len(listed) > limit:
        lines.append(f"  ... and {len(listed) - limit} more")
    return "\n".join(lines)

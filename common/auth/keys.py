"""The token keys: the key folder (BANK_TOKEN_KEY_DIR), the key ring read from it and followed
while it changes, and the operator's rotation: `python -m common.auth keys|rotate|retire`."""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import re
import secrets
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pyseto import Key
from pyseto.key_interface import KeyInterface

from common.config import Settings
from common.config import load as load_settings
from common.logging import fields

log = logging.getLogger("auth")

#
# The key folder (BANK_TOKEN_KEY_DIR):
#   <name>.public.pem   a verification key: every one in the folder verifies
#   <name>.private.pem  the signing key: exactly one in the folder (its public key beside it)
#   service.token       the shared secret of internal RPCs
# `python -m common.auth rotate` adds a pair and makes it the one private key; the previous
# public key stays, so the tokens it signed keep verifying until it is retired
# (`python -m common.auth retire <name>`, or the next rotate once no token it signed can still
# be alive). Every process re-reads the folder when it changes (KeyWatch), without a restart.

PUBLIC_SUFFIX = ".public.pem"
PRIVATE_SUFFIX = ".private.pem"
KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# Clocks of the machines that sign and verify may differ by this much.
CLOCK_SKEW_S = 60
# A folder read while a rotation is half done (two private keys for a moment) is read again.
LOAD_TRIES = 5
LOAD_RETRY_S = 0.1


class KeyFolderError(Exception):
    """The key folder does not hold what it must (operator error, or a rotation half done)."""


@dataclass(frozen=True)
class KeyRing:
    signing_key: KeyInterface | None  # only svc_customer needs it; others verify only
    signing_kid: str  # "" when the ring cannot sign
    verify_keys: Mapping[str, KeyInterface]  # kid -> public key
    service_token: str
    folder: Path | None = None  # where the ring was read; None: a fixed ring (tests)


def _write_once(path: Path, data: bytes) -> None:
    """Create path with data unless it exists; safe when several processes race."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o600)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def _new_key_pair(folder: Path, name: str) -> None:
    """A fresh Ed25519 pair. The public key is derived from the private file that won, so two
    processes creating the same first key at once still end with a matching pair."""
    private_path = folder / f"{name}{PRIVATE_SUFFIX}"
    _write_once(private_path, Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    private = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
    assert isinstance(private, Ed25519PrivateKey)
    _write_once(folder / f"{name}{PUBLIC_SUFFIX}", private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def _names(folder: Path, suffix: str) -> list[str]:
    return sorted(path.name.removesuffix(suffix) for path in folder.glob(f"*{suffix}"))


def signing_key_name(folder: Path) -> str:
    """The name of the folder's one private key."""
    names = _names(folder, PRIVATE_SUFFIX)
    if len(names) != 1:
        raise KeyFolderError(f"{folder} must hold exactly one *{PRIVATE_SUFFIX} (the signing key); it holds "
                             f"{len(names)}")
    return names[0]


def ensure_local_keys(settings: Settings) -> None:
    """The local stack's first key pair (named BANK_TOKEN_SIGNING_KEY) and service token,
    created on first use."""
    folder = Path(settings.key_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if not _names(folder, PRIVATE_SUFFIX):
        _new_key_pair(folder, settings.token_signing_key)
    token_path = folder / "service.token"
    if not token_path.exists():
        _write_once(token_path, secrets.token_urlsafe(32).encode())


def _read_ring(folder: Path, signing: bool, service_token: str) -> KeyRing:
    verify: dict[str, KeyInterface] = {}
    for name in _names(folder, PUBLIC_SUFFIX):
        key = Key.new(version=4, purpose="public", key=(folder / f"{name}{PUBLIC_SUFFIX}").read_bytes())
        verify[key.to_paserk_id()] = key
    if not verify:
        raise KeyFolderError(f"no *{PUBLIC_SUFFIX} verification keys in {folder}")
    signing_key, signing_kid = None, ""
    if signing:
        name = signing_key_name(folder)
        signing_key = Key.new(version=4, purpose="public", key=(folder / f"{name}{PRIVATE_SUFFIX}").read_bytes())
        signing_kid = Key.new(version=4, purpose="public",
                              key=(folder / f"{name}{PUBLIC_SUFFIX}").read_bytes()).to_paserk_id()
        assert signing_kid in verify
    return KeyRing(signing_key, signing_kid, verify, service_token, folder)


def load_keys(settings: Settings, signing: bool) -> KeyRing:
    if settings.token_generate_local_keys:
        ensure_local_keys(settings)
    folder = Path(settings.key_dir)
    service_token = settings.service_token or (folder / "service.token").read_text().strip()
    for attempt in range(1, LOAD_TRIES + 1):
        try:
            return _read_ring(folder, signing, service_token)
        except (KeyFolderError, FileNotFoundError):
            if attempt == LOAD_TRIES:
                raise
            time.sleep(LOAD_RETRY_S)  # at start only: nothing else runs yet
    raise AssertionError("unreachable")


def _folder_stamp(folder: Path) -> int | None:
    """Changes whenever a file is added, removed or renamed in the folder (its mtime)."""
    try:
        return folder.stat().st_mtime_ns
    except OSError:
        return None


class KeyWatch:
    """A key ring that follows its folder: the folder's mtime is looked at (one stat, a few
    microseconds) at most every RECHECK_S, or sooner when a token names a key the ring lacks,
    and the folder is read again only when it changed. A folder caught mid-rotation keeps the
    previous ring until the next look."""

    RECHECK_S = 1.0
    FORCED_RECHECK_S = 0.1  # unknown key ids are the caller's choice: bounded re-reads

    def __init__(self, ring: KeyRing) -> None:
        self._ring = ring
        self._stamp = _folder_stamp(ring.folder) if ring.folder is not None else None
        self._checked_at = time.monotonic()

    def ring(self, recheck_now: bool = False) -> KeyRing:
        folder = self._ring.folder
        now = time.monotonic()
        since = now - self._checked_at
        if folder is None or since < (self.FORCED_RECHECK_S if recheck_now else self.RECHECK_S):
            return self._ring
        self._checked_at = now
        stamp = _folder_stamp(folder)
        if stamp == self._stamp:
            return self._ring
        try:
            self._ring = _read_ring(folder, self._ring.signing_key is not None, self._ring.service_token)
            self._stamp = stamp
            log.info("token keys reloaded", extra=fields(kids=sorted(self._ring.verify_keys),
                                                         signing_kid=self._ring.signing_kid or None))
        except (KeyFolderError, OSError, ValueError) as exc:
            log.warning("token key folder unreadable; keeping the previous keys", extra=fields(error=str(exc)))
        return self._ring


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """One rotation or retirement at a time per folder."""
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _signing_since(folder: Path, name: str) -> float:
    """When the key began to sign: its private key file was written then (by rotate)."""
    return (folder / f"{name}{PRIVATE_SUFFIX}").stat().st_mtime


@dataclass(frozen=True)
class Rotation:
    new_name: str
    previous_name: str
    retired: list[str]


def rotate(settings: Settings) -> Rotation:
    """A new key pair becomes the signing key. The previous public key stays (its tokens keep
    verifying); keys that stopped signing before the previous one began are retired if that
    was longer ago than an access token lives: no token they signed can be alive."""
    folder = Path(settings.key_dir)
    with _folder_lock(folder):
        previous = signing_key_name(folder)
        previous_since = _signing_since(folder, previous)
        name = f"key-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"
        _new_key_pair(folder, name)
        # Two private keys for a moment (readers keep their previous ring meanwhile), never none.
        (folder / f"{previous}{PRIVATE_SUFFIX}").unlink()
        retired: list[str] = []
        if time.time() - previous_since > settings.access_token_ttl_s + CLOCK_SKEW_S:
            for old in _names(folder, PUBLIC_SUFFIX):
                if old not in (previous, name):
                    (folder / f"{old}{PUBLIC_SUFFIX}").unlink()
                    retired.append(old)
    return Rotation(name, previous, retired)


def retire(settings: Settings, name: str, now: bool = False) -> None:
    """Drop a verification key: the tokens it signed stop working within a second everywhere.
    Refused for the signing key, and, unless now, while a token it signed may still be alive."""
    folder = Path(settings.key_dir)
    if not KEY_NAME.match(name):
        raise KeyFolderError(f"{name!r} is not a key name")
    with _folder_lock(folder):
        signing = signing_key_name(folder)
        if name == signing:
            raise KeyFolderError(f"{name} is the signing key: rotate first")
        public = folder / f"{name}{PUBLIC_SUFFIX}"
        if not public.exists():
            raise KeyFolderError(f"no key {name} in {folder}")
        safe_at = _signing_since(folder, signing) + settings.access_token_ttl_s + CLOCK_SKEW_S
        if not now and time.time() < safe_at:
            raise KeyFolderError(
                f"tokens signed by {name} may be alive until {time.strftime('%H:%M:%SZ', time.gmtime(safe_at))}; "
                "retire it then, or pass --now to cut them off at once (their sessions refresh)")
        public.unlink()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.auth", description="Manage the access-token keys.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("keys", help="list the keys: name, key id, which one signs")
    commands.add_parser("rotate", help="make a new signing key; the previous one keeps verifying")
    retiring = commands.add_parser("retire", help="drop a verification key (not the signing key)")
    retiring.add_argument("name")
    retiring.add_argument("--now", action="store_true", help="even if tokens it signed may still be alive")
    args = parser.parse_args(argv)
    settings = load_settings()
    try:
        if args.command == "rotate":
            done = rotate(settings)
            print(f"signing with {done.new_name}; {done.previous_name} still verifies"
                  + (f"; retired {', '.join(done.retired)}" if done.retired else ""))
        elif args.command == "retire":
            retire(settings, args.name, args.now)
            print(f"retired {args.name}")
        else:
            folder = Path(settings.key_dir)
            signing = signing_key_name(folder)
            for name in _names(folder, PUBLIC_SUFFIX):
                kid = Key.new(version=4, purpose="public", key=(folder / f"{name}{PUBLIC_SUFFIX}").read_bytes())
                print(f"{name}\t{kid.to_paserk_id()}\t{'signing' if name == signing else 'verifying'}")
    except KeyFolderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


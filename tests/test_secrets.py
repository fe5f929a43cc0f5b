"""Secrets stay out of logs and out of the repository.

The logs of the whole test run are searched at the end of the session (tests/conftest.py,
tests/secret_scan.py); here: that search finds what it must (and only that), and the
repository tracks no key, token or password file. The one secret with a default in the code,
the local teller's password, is the local stack's documented default; deployments supply
BANK_TELLER_PASSWORD from their secret store (docs/decisions, key rotation record)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from common import config
from common.config import REPO_ROOT
from tests.secret_scan import Registry, log_sizes, scan


def test_the_log_scan_finds_every_kind_of_secret_and_nothing_else(tmp_path: Path) -> None:
    registry = Registry()
    password, token = "a long secret passphrase", "A" * 20 + "b_-" * 7 + "xy"
    registry.remember(password)
    registry.remember(token)
    registry.remember("short")  # too short to search for without false alarms
    registry.remember_code("424242", "customer-7", "ada@example.com")
    old = tmp_path / "svc_old.log"
    old.write_text(f'{{"message": "before the session", "password": "{password}"}}\n')
    since = log_sizes(tmp_path)
    with open(old, "a") as log:
        log.write('{"message": "fine", "duration_ms": 424242}\n')  # a code, but not next to its customer
        log.write(f'{{"message": "oops", "body": "{password}"}}\n')
    (tmp_path / "envoy.log").write_text("\n".join([
        '{"path": "/v1/accounts", "status": "200"}',
        f'{{"refresh": "{token}"}}',
        '{"authorization": "Bearer v4.public.eyJzdWIiOiAiYWRhIn0abcdefghijkl"}',
        '{"customer": "customer-7", "note": "code 424242"}',
        "-----BEGIN PRIVATE KEY-----",
        '{"short": "short", "uuid": "0194a3b2c7d87e5f9a0b1c2d3e4f5a6b"}',
    ]) + "\n")
    found = {(f.log.name, f.line, f.what) for f in scan(tmp_path, since, registry)}
    assert found == {
        ("svc_old.log", 3, "a password"),  # line 1 was written before the session: not read
        ("envoy.log", 2, "an enrollment, refresh or service token"),
        ("envoy.log", 3, "a PASETO token"),
        ("envoy.log", 4, "a verification or reset code, next to its customer"),
        ("envoy.log", 5, "a private key"),
    }


def test_new_and_current_passwords_of_the_recovery_routes_are_searched_for(tmp_path: Path) -> None:
    """ResetPassword and ChangePassword carry passwords in new_password and current_password."""
    registry = Registry()
    registry.remember_fields({"email": "ada@example.com", "code": "123456", "new_password": "new secret passphrase"})
    registry.remember_fields({"current_password": "old secret passphrase", "new_password": "next secret passphrase"})
    since = log_sizes(tmp_path)
    (tmp_path / "svc_customer.log").write_text("\n".join([
        '{"message": "reset", "body": "new secret passphrase"}',
        '{"message": "change", "current": "old secret passphrase"}',
        '{"message": "change", "new": "next secret passphrase"}',
        '{"message": "fine", "email": "ada@example.com"}',
    ]) + "\n")
    assert [(f.line, f.what) for f in scan(tmp_path, since, registry)] == [
        (1, "a password"), (2, "a password"), (3, "a password")]


def test_a_log_started_anew_is_read_whole(tmp_path: Path) -> None:
    registry = Registry()
    registry.remember("another secret passphrase")
    log = tmp_path / "svc.log"
    log.write_text("x" * 1000 + "\n")
    since = log_sizes(tmp_path)
    log.write_text('{"password": "another secret passphrase"}\n')  # shorter than recorded: a new file
    assert [(f.line, f.what) for f in scan(tmp_path, since, registry)] == [(1, "a password")]


def _tracked() -> list[str]:
    return subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, text=True,
                          check=True).stdout.split("\0")


def test_no_key_or_secret_file_is_tracked() -> None:
    secret_names = re.compile(r"(\.pem|\.key|\.p12|\.pfx|\.token|id_rsa|id_ed25519)$")
    tracked = [path for path in _tracked() if path]
    assert tracked, "git ls-files listed nothing"
    assert not [path for path in tracked if secret_names.search(path)]
    # Settings files name secrets only to leave them out (deployments reference a secret store).
    secret_setting = re.compile(r"^\s*BANK_[A-Z_]*(PASSWORD|TOKEN|SECRET)\s*=\s*\S", re.MULTILINE)
    assert not [path for path in tracked if path.endswith(".env")
                and secret_setting.search((REPO_ROOT / path).read_text(errors="replace"))]
    # A PEM private key has base64 lines after its header; a mention of the header does not.
    pem = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----\s+[A-Za-z0-9+/=]{40,}")
    holding = [path for path in tracked if (REPO_ROOT / path).is_file()
               and (REPO_ROOT / path).stat().st_size < 2_000_000
               and pem.search((REPO_ROOT / path).read_text(errors="replace"))]
    assert not holding, holding


def test_the_stack_folder_and_key_folders_are_ignored() -> None:
    settings = config.load()
    candidates = [Path(settings.stack_dir) / "logs" / "svc_customer.log",
                  Path(settings.key_dir) / "local-1.private.pem", Path(settings.key_dir) / "service.token",
                  REPO_ROOT / ".stack" / "tls" / "server.key"]
    for path in candidates:
        if not path.resolve().is_relative_to(REPO_ROOT):
            continue  # kept outside the checkout: git cannot see it
        relative = str(path.resolve().relative_to(REPO_ROOT))
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", relative], cwd=REPO_ROOT)
        assert ignored.returncode == 0, f"{relative} is not git-ignored"


def test_the_live_keys_and_service_token_appear_in_no_tracked_file() -> None:
    settings = config.load()
    folder = Path(settings.key_dir)
    if not folder.is_dir():
        return
    secrets = [path.read_text().strip() for path in folder.glob("*.private.pem")]
    secrets += [(folder / "service.token").read_text().strip()] if (folder / "service.token").is_file() else []
    bodies = [line for secret in secrets for line in secret.splitlines() if len(line) >= 40]
    for path in _tracked():
        file = REPO_ROOT / path
        if path and file.is_file() and file.stat().st_size < 2_000_000:
            text = file.read_text(errors="replace")
            assert not [body for body in bodies if body in text], path


def test_local_default_secrets_count_only_on_the_local_stack() -> None:
    assert config.load({}).local_secrets_in_use() == []  # the local stack: its defaults are the point
    deployed = {"BANK_TOKEN_GENERATE_LOCAL_KEYS": "false"}
    assert config.load(deployed).local_secrets_in_use() == ["BANK_PG_PASSWORD", "BANK_TELLER_PASSWORD"]
    assert config.load({**deployed, "BANK_TELLER_PASSWORD": "from-the-secret-store"}).local_secrets_in_use() == [
        "BANK_PG_PASSWORD"]
    assert config.load({**deployed, "BANK_TELLER_PASSWORD": "a", "BANK_PG_PASSWORD": "b"}).local_secrets_in_use() == []


def test_a_deployed_service_refuses_to_start_with_a_local_default_secret() -> None:
    """A forgotten BANK_TELLER_PASSWORD outside the local stack would open the teller login with
    a password written in this repository: the service exits before it listens or connects."""
    env = {k: v for k, v in os.environ.items() if k not in ("BANK_PG_PASSWORD", "BANK_TELLER_PASSWORD")}
    env.update(BANK_TOKEN_GENERATE_LOCAL_KEYS="false", BANK_PG_PASSWORD="set-by-the-deployment")
    result = subprocess.run([sys.executable, "-m", "svc_customer"], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert line["level"] == "ERROR" and line["message"].startswith("refusing to start")
    assert line["variables"] == ["BANK_TELLER_PASSWORD"]
    assert "teller-local-password" not in result.stdout + result.stderr

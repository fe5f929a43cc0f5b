"""The web app's own unit tests (web/src/*.test.ts, node's test runner): money shown in the
currency's units and typed amounts turned into minor units. No stack needed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from common import config
from devstack import web


def test_web_unit_tests_pass() -> None:
    log = Path(config.load().stack_dir) / "logs" / "web.install.log"
    web.install_packages(log)
    npm = shutil.which("npm")
    assert npm, "npm is missing after install_packages"
    result = subprocess.run([npm, "test", "--silent"], cwd=web.WEB, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# fail 0" in result.stdout and "# pass 0" not in result.stdout, result.stdout

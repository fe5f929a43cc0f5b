"""The protos are the source of truth: lint-clean, and gen/ is exactly what they generate."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from common import config
from common.config import REPO_ROOT
from devstack.components import envoy_config

BIN = Path(sys.executable).parent


def test_buf_lint_is_clean() -> None:
    result = subprocess.run([str(BIN / "buf"), "lint"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_gen_is_fresh() -> None:
    result = subprocess.run([sys.executable, "scripts/gen_protos.py", "--check"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, "gen/ is stale; run `make gen`\n" + result.stdout + result.stderr


def test_local_envoy_config_validates() -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as conf:
        conf.write(envoy_config(config.load({})))
        conf.flush()
        result = subprocess.run([str(BIN / "envoy"), "--mode", "validate", "-c", conf.name],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr

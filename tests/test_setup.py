"""scripts/setup, once it has run, runs again without network: apt only for a missing
package, pip only when pyproject.toml changed (so scripts/demo and scripts/test start
offline)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_a_second_setup_needs_no_network() -> None:
    """In a network namespace with nothing but loopback, scripts/setup succeeds without
    calling pip or apt, the venv as it was."""
    stamp = ROOT / ".venv" / ".courierd-installed"
    if not stamp.exists():
        pytest.skip("scripts/setup has not run here yet (scripts/test and .ci/run run it)")
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    assert stamp.read_text().startswith(wanted), "pyproject.toml changed since the last setup"
    if shutil.which("unshare") is None:
        pytest.skip("cannot make a network namespace: unshare not installed")
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a network namespace: {probe.stderr.strip()}")
    installed_at = stamp.stat().st_mtime_ns  # rewritten after every pip install
    done = subprocess.run(
        ["unshare", "-rn", "scripts/setup"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "installing" not in done.stderr  # no apt
    assert stamp.stat().st_mtime_ns == installed_at, "pip ran although nothing changed"

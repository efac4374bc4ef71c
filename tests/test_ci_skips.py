"""Under CI=true a skipped test fails the run (tests/conftest.py), unless its reason is on
ALLOWED_SKIPS; elsewhere a skip only says why."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import inner_pytest

ROOT = Path(__file__).resolve().parent.parent
SKIPPING = """
import pytest

def test_needs_a_tool():
    pytest.skip("{reason}")
"""


def run_suite_of_one(tmp_path: Path, reason: str, ci: bool) -> subprocess.CompletedProcess[str]:
    test = tmp_path / "test_one.py"
    test.write_text(SKIPPING.format(reason=reason))
    pytest, env = inner_pytest()
    if ci:
        env["CI"] = "true"
    return subprocess.run(
        [*pytest, "--rootdir", str(tmp_path), "-c", str(ROOT / "pyproject.toml"), str(test)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_skip_fails_a_ci_run_unless_its_reason_is_allowed(tmp_path: Path) -> None:
    """CI=true: an unlisted skip fails the run, naming it; a listed one passes; outside
    CI the same skip passes, its reason printed."""
    failed = run_suite_of_one(tmp_path, "chromium is not installed", ci=True)
    assert failed.returncode == 1, failed.stdout
    assert "skips fail the run under CI=true" in failed.stdout
    assert "test_needs_a_tool: chromium is not installed" in failed.stdout
    allowed = run_suite_of_one(tmp_path, "cannot mount a tmpfs here: permission denied", ci=True)
    assert allowed.returncode == 0, allowed.stdout
    local = run_suite_of_one(tmp_path, "chromium is not installed", ci=False)
    assert local.returncode == 0, local.stdout
    assert "SKIPPED [1]" in local.stdout and "chromium is not installed" in local.stdout

"""The suite's own PostgreSQL (tests/pg.py): started for a run that needs it, stopped and
its folder removed at the end, also when the run fails."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests import pg
from tests.conftest import inner_pytest

ROOT = Path(__file__).resolve().parent.parent
FAILING = """
import psycopg
from tests import pg

def test_uses_postgres_then_fails():
    with pg.database() as url, psycopg.connect(url) as conn:
        print("SERVER", pg.admin_url(), conn.execute("SELECT 1").fetchone())
        assert False, "failing on purpose"
"""


def test_a_failing_run_leaves_no_server_and_no_folder(tmp_path: Path) -> None:
    """A run that failed half way through a PostgreSQL test still stops its private
    server and removes its data folder."""
    if pg.SHARED_URL is not None:
        pytest.skip("COURIERD_TEST_PG_URL names a server: no private one to check")
    # The run's temporary folder is one of its own: another server's folder (a pytest-xdist
    # worker's beside this one) never counts, and the check sees every folder it left.
    # Traversable by all: the server runs as the `postgres` OS user under root.
    tmp = Path(tempfile.mkdtemp(prefix="courierd-pgtest-"))
    tmp.chmod(0o755)
    test = tmp_path / "test_fails.py"
    test.write_text(FAILING)
    pytest_run, env = inner_pytest()
    env["TMPDIR"] = str(tmp)
    config = ["--rootdir", str(tmp_path), "-c", str(ROOT / "pyproject.toml")]
    try:
        done = subprocess.run(
            [*pytest_run, *config, "-s", str(test)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        left = list(tmp.glob(pg.FOLDER_PREFIX + "*"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert done.returncode == 1 and "failing on purpose" in done.stdout, done.stdout
    server = re.search(r"SERVER postgresql://postgres@127\.0\.0\.1:(\d+)/", done.stdout)
    assert server is not None, done.stdout
    port = server[1]
    assert port != "5432"  # its own server, not the machine's
    assert left == [], left
    postmasters = subprocess.run(["pgrep", "-f", f"port={port}"], capture_output=True, text=True)
    assert postmasters.stdout == "", postmasters.stdout

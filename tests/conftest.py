"""Shared fixtures: a real OneTablet stand-in on loopback, a temp store, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from courierd.devtools.sandbox import Sandbox
from courierd.store.sqlite import Store

API_KEY = "test-key-5f2c"


@pytest.fixture
def onetablet() -> Iterator[Sandbox]:
    """A real HTTP server on 127.0.0.1 standing in for OneTablet."""
    sandbox = Sandbox(api_key=API_KEY).start()
    yield sandbox
    sandbox.stop()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "var" / "courierd.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    s = Store(db_path)
    yield s
    s.close()


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(tmp_path: Path, db_path: Path, onetablet: Sandbox):
    """Run the real `courierd` entry point in a subprocess, configured by environment."""

    def run(*args: str, stdin: bytes | None = None, env: dict[str, str] | None = None) -> Result:
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("COURIERD_")},
            "COURIERD_ONETABLET__BASE_URL": onetablet.url,
            "COURIERD_ONETABLET__API_KEY": API_KEY,
            "COURIERD_ONETABLET__RETRY_SCHEDULE_S": "[0.05, 0.05, 0.05]",
            "COURIERD_STORE__PATH": str(db_path),
            **(env or {}),
        }
        proc = subprocess.run(
            [sys.executable, "-m", "courierd", *args],
            input=stdin,
            capture_output=True,
            env=full_env,
            cwd=tmp_path,
            timeout=60,
        )
        return Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode())

    return run

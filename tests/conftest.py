"""Shared fixtures: a real OneTablet stand-in on loopback, a temp store, the CLI, and
a guard that no process a test started outlives it.

Every process the suite starts inherits TESTRUN_COURIERD (a fresh value per run), so
whatever a test leaves behind, however deep in a process tree, can be found in /proc.
After each test the leftovers are killed and recorded; the session then fails. Under
pytest-xdist (`-n`, as scripts/test runs it) each worker has a marker of its own and
guards only its own processes; the controller fails the run on what the workers found.

Under CI=true a skipped test fails the run, unless its reason is on ALLOWED_SKIPS: a
missing tool must not turn a section of the suite silently green.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
from hypothesis import settings

from courierd.config import StoreSettings
from courierd.devtools.sandbox import Sandbox
from courierd.store import Store, open_store
from tests import pg
from tests.harness import API_KEY, Broker, Rig, open_path, stop_all

# Speed is measured in the bench, never asserted: Hypothesis's default deadline (200 ms
# an example) failed a chain property test on a machine at load 18. Every @settings
# in the tests inherits this profile (it is loaded before they are imported).
settings.register_profile("courierd", deadline=None)
settings.load_profile("courierd")

__all__ = ["API_KEY", "open_path"]
MARKER = "TESTRUN_COURIERD"
_LEAKS: list[str] = []
# The only skips CI accepts: reason prefix -> why it may skip there.
ALLOWED_SKIPS = {
    "cannot mount a tmpfs here": "mounting needs root with CAP_SYS_ADMIN, which CI "
    "containers often lack; the full disk is then tested on machines that can mount",
    "cannot make a network namespace": "the offline setup test needs unshare -rn (user "
    "namespaces), which some CI containers forbid",
    "COURIERD_TEST_PG_URL names a server": "a run on a server of yours has no private "
    "PostgreSQL whose cleanup could be checked",
}
_SKIPS: list[str] = []


def inner_pytest() -> tuple[list[str], dict[str, str]]:
    """The command and environment of a pytest run inside this one (the tests of the
    suite's own guards): without CI's setting, this run's marker or a pytest-xdist
    worker's variables, and with only the plugins the suite's settings name (the
    installed ones, schemathesis and hypothesis, cost 2 s of CPU a run, for nothing)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CI", MARKER) and not k.startswith("PYTEST_XDIST")
    }
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    command = [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "pytest_timeout"]
    return [*command, "-p", "no:cacheprovider"], env


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


def xdist_controller(config: pytest.Config) -> bool:
    """True in the process that hands tests to pytest-xdist workers (`-n`) and runs none."""
    return (
        not hasattr(config, "workerinput")
        and config.getoption("dist", "no") != "no"
        and not config.getoption("collectonly")
    )


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        # An xdist worker: a marker of its own (not the one it may have inherited), so
        # that its guard never takes another worker's processes for its leftovers.
        os.environ[MARKER] = uuid.uuid4().hex
    elif not xdist_controller(config):
        os.environ.setdefault(MARKER, uuid.uuid4().hex)
    # (The controller starts nothing: each worker guards its own processes and
    # databases, and hands its leftovers to it at the end; pytest_testnodedown.)
    if pg.SHARED_URL is not None and pg.available() is None:
        pg.drop_leftovers()  # databases a crashed earlier run left behind


def _record_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)
    reason = reason.removeprefix("Skipped: ")
    if not any(reason.startswith(allowed) for allowed in ALLOWED_SKIPS):
        _SKIPS.append(f"{report.nodeid}: {reason}")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _record_skip(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _record_skip(report)  # a whole module skipped at import (allow_module_level)


def marked_processes() -> dict[int, str]:
    """pid → command line of every live process carrying this run's marker."""
    needle = f"{MARKER}={os.environ[MARKER]}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":  # a zombie is already dead, only not yet reaped
                    found[int(entry.name)] = cmd.strip()
        except OSError:
            continue
    return found


def _kill_all(pids: dict[int, str]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(p in marked_processes() for p in pids):
            time.sleep(0.05)


@pytest.fixture(autouse=True)
def no_process_outlives_the_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """Runs last: whatever a test (or its fixtures) left running is killed and recorded."""
    yield
    # Workers of a daemon that was just killed exit on their own within moments.
    deadline = time.monotonic() + 3
    while (left := marked_processes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        _kill_all(left)
        _LEAKS.extend(f"{request.node.nodeid}: pid {p} {cmd[:120]}" for p, cmd in left.items())


@pytest.fixture(autouse=True)
def stop_what_the_test_started(no_process_outlives_the_test: None) -> Iterator[None]:
    """Ends the brokers and daemons a test started (before the guard looks for leftovers)."""
    from tests.harness import stop_all

    yield
    stop_all()


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown to a run without it
def pytest_testnodedown(node: Any, error: object) -> None:
    """Under xdist, in the controller: a finished worker's leftovers fail the run here
    (a worker's own exit status does not)."""
    _LEAKS.extend(getattr(node, "workeroutput", {}).get("courierd_leaks", []))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if pg.SHARED_URL is not None and pg.available() is None:
        pg.drop_leftovers(everything=True)  # every database this run created
    pg.stop_server()
    left = {} if MARKER not in os.environ else marked_processes()
    _kill_all(left)
    leaks = _LEAKS + [f"(at the end) pid {p} {cmd[:120]}" for p, cmd in left.items()]
    if hasattr(session.config, "workerinput"):
        session.config.workeroutput["courierd_leaks"] = leaks  # type: ignore[attr-defined]
    if leaks:
        sys.stderr.write("\nprocesses outlived their tests:\n  " + "\n  ".join(leaks) + "\n")
        session.exitstatus = 1
    if in_ci() and _SKIPS:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if in_ci() and _SKIPS:
        terminalreporter.section("skips fail the run under CI=true", sep="=", red=True)
        terminalreporter.line("not on ALLOWED_SKIPS in tests/conftest.py:")
        for skip in _SKIPS:
            terminalreporter.line(f"  {skip}")


@pytest.fixture
def onetablet() -> Iterator[Sandbox]:
    """A real HTTP server on 127.0.0.1 standing in for OneTablet."""
    sandbox = Sandbox(api_key=API_KEY).start()
    yield sandbox
    sandbox.stop()


@pytest.fixture
def rig(tmp_path: Path, onetablet: Sandbox, backend: str) -> Iterator[Rig]:
    """Broker, OneTablet stand-in and store for daemons: on each backend in turn (on
    PostgreSQL the daemon is a cluster of one, through shared subscriptions)."""
    broker = Broker(tmp_path / "broker").start()
    if backend == "sqlite":
        yield Rig(broker, onetablet, tmp_path)
        return
    with pg.database() as url:
        yield Rig(broker, onetablet, tmp_path, url)
        stop_all()  # the daemons, before their database is dropped


@pytest.fixture
def sqlite_rig(tmp_path: Path, onetablet: Sandbox) -> Iterator[Rig]:
    """The same on SQLite only: for what is about SQLite, or the same on any store."""
    broker = Broker(tmp_path / "broker").start()
    yield Rig(broker, onetablet, tmp_path)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "var" / "courierd.db"


BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each test using it runs once per store backend."""
    if request.param == "postgres" and (why := pg.available()) is not None:
        pytest.skip(why)
    return str(request.param)


@pytest.fixture
def store_settings(backend: str, db_path: Path) -> Iterator[StoreSettings]:
    """Settings of a fresh store on `backend`: a file, or a database dropped afterwards."""
    if backend == "sqlite":
        yield StoreSettings(path=db_path)
        return
    with pg.database() as url:
        yield StoreSettings(url=url)


@pytest.fixture
def store(store_settings: StoreSettings) -> Iterator[Store]:
    """A fresh store, on each backend in turn."""
    s = open_store(store_settings)
    yield s
    s.close()


@pytest.fixture
def sqlite_store(db_path: Path) -> Iterator[Store]:
    """A fresh SQLite store, for what only SQLite has (PRAGMAs, query plans, files)."""
    s = open_path(db_path)
    yield s
    s.close()


@dataclass
class Result:
    code: int
    out: str
    err: str


class Cli(Protocol):
    """The `cli` fixture: runs `courierd *args` and returns its exit code and output."""

    def __call__(
        self, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
    ) -> Result: ...


@pytest.fixture
def cli(tmp_path: Path, db_path: Path, onetablet: Sandbox) -> Cli:
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

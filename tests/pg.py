"""PostgreSQL for tests: a private server of the suite's own, one database per test,
dropped afterwards.

As the suite starts its own Mosquitto, it starts its own PostgreSQL: `initdb` into a
temporary folder, `postgres` on a free loopback port, once per run, stopped and its folder
removed at the end (even when the run fails). PostgreSQL refuses to run as root, so under
root both run as the `postgres` OS user, in a folder it owns. COURIERD_TEST_PG_URL names a
server to use instead (an admin URL, e.g. postgresql://postgres@127.0.0.1:5432/postgres).

A template database, migrated once per run, makes each test's database a fast copy.
Every database the suite creates is named `courierd_t_<start time>_<run>_...`: at the
end of a run its own are dropped, and on a shared server (COURIERD_TEST_PG_URL) whatever
a crashed run left behind (started hours ago; never a run still going beside this one) is
dropped at the next start.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from courierd.devtools.localbroker import free_port

SHARED_URL = os.environ.get("COURIERD_TEST_PG_URL")
RUN = f"{int(time.time())}_{uuid.uuid4().hex[:6]}"
PREFIX = "courierd_t_"
STALE_S = 3 * 3600  # a run that started this long ago is over
# The private server carries no test-run marker (tests/conftest.py): it lives for the
# whole session, not one test, and is stopped by stop_server().
_UNMARKED_ENV = {k: v for k, v in os.environ.items() if k != "TESTRUN_COURIERD"}


FOLDER_PREFIX = "courierd-test-pg-"


class PrivateServer:
    """`initdb` + `postgres` in a temporary folder on a free port, for this run only."""

    def __init__(self) -> None:
        self.bindir = server_bindir()
        self.user = "postgres" if os.geteuid() == 0 else None
        remove_dead_folders()
        self.dir = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "postgres.log"
        if self.user is not None:
            owner = pwd.getpwnam(self.user)
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self, timeout: float = 60) -> PrivateServer:
        data = self.dir / "data"
        initdb = [str(self.bindir / "initdb"), "-D", str(data), "-U", "postgres"]
        subprocess.run(
            [*initdb, "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"],
            check=True,
            capture_output=True,
            env=_UNMARKED_ENV,
            user=self.user,
            timeout=timeout,
        )
        # Durability of the test server itself is not under test: fsync off saves seconds.
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.dir),
            "max_connections": "200",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        args = [a for k, v in settings.items() for a in ("-c", f"{k}={v}")]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(data), *args],
                stdout=log,
                stderr=log,
                env=_UNMARKED_ENV,
                user=self.user,
                preexec_fn=_die_with_parent,
                start_new_session=True,  # a Ctrl-C in the terminal is pytest's, not its
            )
        deadline = time.monotonic() + timeout
        while (why := _unreachable(self.url)) is not None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"test PostgreSQL did not start ({why}):\n{self._log_tail()}")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        """Fast shutdown (SIGINT), SIGKILL if that hangs; then remove the folder."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-2000:]
        return ""


def remove_dead_folders(min_age_s: float = 600) -> None:
    """Remove the folders of private servers whose run was killed (no live postmaster;
    older than a run's start-up, so never one being set up beside this run)."""
    for folder in Path(tempfile.gettempdir()).glob(FOLDER_PREFIX + "*"):
        with contextlib.suppress(OSError, ValueError):
            if time.time() - folder.stat().st_mtime < min_age_s:
                continue
            pidfile = folder / "data" / "postmaster.pid"
            if pidfile.exists():
                pid = int(pidfile.read_text().split()[0])
                if Path(f"/proc/{pid}").exists():
                    continue
            shutil.rmtree(folder, ignore_errors=True)


def server_bindir() -> Path:
    """Where `initdb` and `postgres` are: pg_config's bindir, Debian's versioned folders,
    or PATH. (Debian puts only wrappers on PATH, without `postgres` itself.)"""
    candidates = []
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        found = subprocess.run(["pg_config", "--bindir"], capture_output=True, check=True)
        candidates.append(Path(found.stdout.decode().strip()))
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True)
    candidates += [Path(p) for p in versions]
    if (initdb := shutil.which("initdb")) is not None:
        candidates.append(Path(initdb).resolve().parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    raise RuntimeError("PostgreSQL server binaries not found: apt-get install postgresql")


def _version(bindir: str) -> int:
    part = Path(bindir).parent.name
    return int(part) if part.isdigit() else 0


def _die_with_parent() -> None:
    """In the child: if pytest dies without stopping the server, it shuts down at once
    (SIGQUIT is PostgreSQL's immediate shutdown). Runs after the switch of user."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGQUIT)


def _unreachable(url: str) -> str | None:
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as e:
        return str(e).strip()
    return None


_server: PrivateServer | None = None
_server_error: str | None = None


def admin_url() -> str:
    """The server's admin URL: COURIERD_TEST_PG_URL, or the private server (started on
    first use)."""
    global _server, _server_error
    if SHARED_URL is not None:
        return SHARED_URL
    if _server is None and _server_error is None:
        try:
            _server = PrivateServer().start()
            atexit.register(stop_server)
        except (OSError, RuntimeError, KeyError, subprocess.SubprocessError) as e:
            _server_error = f"could not start a test PostgreSQL: {e}"
    if _server is None:
        raise RuntimeError(_server_error)
    return _server.url


def stop_server() -> None:
    """Stop the private server, if one was started (the end of the run)."""
    global _server
    if _server is not None:
        _server.stop()
        _server = None


def url_of(dbname: str) -> str:
    base = admin_url().rsplit("/", 1)[0]
    return f"{base}/{dbname}"


def available() -> str | None:
    """None if PostgreSQL answers, else why not."""
    try:
        url = admin_url()
    except RuntimeError as e:
        return str(e)
    if (why := _unreachable(url)) is not None:
        return f"PostgreSQL not reachable at {url}: {why}"
    return None


def _admin(sql: str) -> None:
    with psycopg.connect(admin_url(), autocommit=True) as conn:
        conn.execute(sql)


_template: str | None = None


def template() -> str:
    """A database with courierd's schema, made once per run."""
    global _template
    if _template is None:
        from courierd.store.postgres import PostgresDatabase

        name = f"{PREFIX}{RUN}_template"
        _admin(f'CREATE DATABASE "{name}"')
        PostgresDatabase(url_of(name)).close()
        _template = name
    return _template


@contextmanager
def database(from_template: bool = True) -> Iterator[str]:
    """A fresh database (its URL) for the length of the block; dropped afterwards."""
    name = f"{PREFIX}{RUN}_{uuid.uuid4().hex[:10]}"
    copy = f' TEMPLATE "{template()}"' if from_template else ""
    _admin(f'CREATE DATABASE "{name}"{copy}')
    try:
        yield url_of(name)
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def drop_leftovers(everything: bool = False) -> list[str]:
    """Drop test databases of runs that crashed hours ago, or (`everything`, at the end
    of a run) every database of this run."""
    with psycopg.connect(admin_url(), autocommit=True) as conn:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE %s", (PREFIX + "%",)
            )
        ]
    dropped = []
    for name in names:
        ours = name.startswith(f"{PREFIX}{RUN}_")
        started = name[len(PREFIX) :].split("_", 1)[0]
        stale = not started.isdigit() or int(started) < time.time() - STALE_S
        if (everything and ours) or (not ours and stale):
            _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            dropped.append(name)
    return dropped

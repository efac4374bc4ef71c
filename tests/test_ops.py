"""Operator commands: outbox status, parked pushes, dead letters, retry, backup."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from courierd.daemonlock import DaemonLock
from courierd.devtools.sandbox import Request, Sandbox
from courierd.domain.model import DeadLetter, Status, StatusEvent
from courierd.store import Store
from courierd.store.outbox import PushResult
from courierd.store.schema import FAILED, SQLITE_MIGRATIONS
from courierd.store.sqlite import SqliteDatabase
from tests.conftest import API_KEY, Cli, open_path
from tests.harness import Broker, Daemon, Publisher, tmpfs, wait_until


@pytest.fixture
def parked(db_path: Path) -> None:
    """An order whose first push was refused (parked), and two dead letters."""
    s = open_path(db_path)
    s.writer.commit(
        [
            StatusEvent("e1", "o1", "c1", Status.ARRIVING_AT_STORE),
            DeadLetter("couriers/c1/status", b"{", "bad_json", "payload is not JSON"),
            DeadLetter("couriers/c1/status", b"[]", "not_object", "payload is a JSON list"),
        ],
        now=1000.0,
    )
    head = s.outbox.claim_due(1000.0, 1)[0]
    s.outbox.record_results([PushResult(head.id, FAILED, 1001.0, None, "400 bad courier_info")])
    s.close()


def test_status_failed_and_dead_letters_as_json(cli: Cli, parked: None) -> None:
    """Scripts get counts, parked pushes with their reason, and dead letters by reason."""
    status = json.loads(cli("outbox", "status", "--json").out)
    assert status["pending"] == 1 and status["failed"] == 1 and status["dead_letters"] == 2
    assert status["oldest_pending_age_s"] > 0
    failed = json.loads(cli("outbox", "failed", "--json").out)
    assert failed == [
        {
            "order_id": "o1",
            "status": "dasher_confirmed",
            "attempts": 1,
            "last_error": "400 bad courier_info",
            "created_at": 1000.0,
        }
    ]
    letters = json.loads(cli("dead-letters", "--json", "--reason", "bad_json").out)
    assert [(d["reason"], d["payload"]) for d in letters] == [("bad_json", "{")]
    text = cli("outbox", "failed").out
    assert "order_id" in text and "400 bad courier_info" in text


def test_retry_one_order_and_refusals(cli: Cli, parked: None, db_path: Path) -> None:
    """retry ORDER_ID makes its failed pushes pending; bad arguments exit 2."""
    assert cli("outbox", "retry").code == 2
    assert cli("outbox", "retry", "o1", "--all").code == 2
    r = cli("outbox", "retry", "nope")
    assert r.code == 2 and "no failed pushes" in r.err
    r = cli("outbox", "retry", "o1", "--json")
    assert r.code == 0 and json.loads(r.out) == {"retried": 1}
    r = cli("outbox", "retry", "--all")  # nothing left to retry: documented exit 2
    assert r.code == 2 and "no failed pushes" in r.err
    s = open_path(db_path)
    assert s.outbox.stats()[2] == 0
    assert [row.status for row in s.outbox.claim_due(10**10, 10)] == ["dasher_confirmed"]
    s.close()


def test_backup_is_a_consistent_copy(cli: Cli, parked: None, tmp_path: Path) -> None:
    """backup writes a usable copy; it refuses to overwrite a file."""
    r = cli("backup", "copy.db")
    assert r.code == 0, r.err
    copy = sqlite3.connect(tmp_path / "copy.db")
    assert copy.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 2
    copy.close()
    r = cli("backup", "copy.db")
    assert r.code == 2 and "exists" in r.err


def _daemon(tmp_path: Path, broker: Broker, onetablet: Sandbox) -> Daemon:
    """A daemon started on `tmp_path / "courierd.db"`, on this broker and stand-in."""
    return Daemon(
        tmp_path,
        {
            "COURIERD_MQTT__URL": broker.url,
            "COURIERD_ONETABLET__BASE_URL": onetablet.url,
            "COURIERD_ONETABLET__API_KEY": API_KEY,
        },
    ).start()


@pytest.mark.integration
def test_parked_push_retried_while_daemon_runs(
    tmp_path: Path, onetablet: Sandbox, cli: Cli
) -> None:
    """A 400 parks the push and holds the order; after the fix, `outbox retry` delivers
    the whole order in order, while the daemon keeps running."""
    onetablet.responder = lambda r: (
        (400, {}, {"error": "Bad Request", "message": "unknown store"})
        if r.json.get("delivery_status") == "dasher_confirmed"
        else None
    )
    broker = Broker(tmp_path / "broker").start()
    daemon = _daemon(tmp_path, broker, onetablet)
    pub = Publisher(broker.port)
    pub.status("c1", "e1", "held", "arrived_at_store")
    store_env = {"COURIERD_STORE__PATH": str(tmp_path / "courierd.db")}
    wait_until(
        lambda: json.loads(cli("outbox", "failed", "--json", env=store_env).out),
        10,
        "the push to be parked",
    )
    shown = json.loads(cli("order", "show", "held", env=store_env).out)
    assert "unknown store" in shown["pushes"][0]["last_error"]
    assert len(onetablet.requests()) == 1  # later pushes wait behind the parked one
    onetablet.responder = None
    assert cli("outbox", "retry", "held", env=store_env).code == 0

    def delivered(rs: list[Request]) -> list[str]:
        return [r.json["delivery_status"] for r in rs if r.status == 200]

    assert onetablet.wait_for(lambda rs: len(delivered(rs)) == 3, 10)
    assert delivered(onetablet.requests()) == [
        "dasher_confirmed",
        "arriving_at_store",
        "arrived_at_store",
    ]
    assert daemon.stop() == 0
    pub.close()
    broker.stop()


def _legacy_database(db_path: Path) -> None:
    """A database as 0.1.0 made them, without auto-vacuum, holding an order, and with
    some 8 MB of freed pages (dead letters deleted)."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        conn.execute("CREATE TABLE before_courierd (x)")  # so the file has pages: no mode
    s = open_path(db_path)
    s.writer.commit([StatusEvent("e1", "o1", "c1", Status.ARRIVING_AT_STORE)], now=1000.0)
    _fill_and_free(s)
    s.close()


def _fill_and_free(s: Store) -> None:
    with s.db.transaction():
        s.db.executemany(
            "INSERT INTO dead_letters (topic, payload, reason, received_at) VALUES (?, ?, ?, ?)",
            [("couriers/c1/status", b"x" * 40_000, "bad_json", "2026-01-01")] * 200,
        )
    with s.db.transaction():
        s.db.execute("DELETE FROM dead_letters")


def test_compact_gives_a_legacy_databases_free_pages_back(
    cli: Cli, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`courierd compact` rewrites a database made without auto-vacuum: the freed space
    goes back to the file system, the data stays, and from then on retention gives
    freed pages back by itself (reclaim_free_pages did nothing before, and says so)."""
    _legacy_database(db_path)
    s = open_path(db_path)
    assert s.db.reclaim_free_pages(512) == 0  # no auto-vacuum: nothing given back
    assert "courierd compact" in caplog.text  # the daemon's log says what to do
    s.close()
    before = db_path.stat().st_size
    assert before > 8_000_000
    done = cli("compact")
    assert done.code == 0, done.err
    assert "auto-vacuum none -> incremental" in done.out
    assert db_path.stat().st_size < 1_000_000
    s = open_path(db_path)
    assert s.db.value("PRAGMA auto_vacuum") == 2
    assert s.outbox.get_order("o1") is not None
    _fill_and_free(s)
    assert s.db.reclaim_free_pages(512) > 0  # retention can give pages back now
    s.close()


def test_compact_refuses_while_the_daemon_runs_and_on_postgresql(cli: Cli, db_path: Path) -> None:
    """compact takes the daemon's lock (a VACUUM would hold every write up for as long
    as it takes), and PostgreSQL is not its business."""
    _legacy_database(db_path)
    lock = DaemonLock(db_path).acquire()
    try:
        refused = cli("compact")
        assert refused.code == 1 and "another courierd daemon" in refused.err
    finally:
        lock.release()
    assert cli("compact", env={"COURIERD_STORE__URL": "postgresql://h/db"}).code == 2
    assert cli("compact").code == 0


@pytest.mark.integration
def test_a_newer_command_does_not_migrate_the_database_under_an_older_daemon(
    tmp_path: Path, onetablet: Sandbox, cli: Cli
) -> None:
    """After an upgrade, before the daemon is restarted: an operator command of the new
    courierd would migrate the database under the old daemon, which then writes as its
    own schema says (after migration 11, every push it writes fails). It refuses, names
    the daemon, and changes nothing. The new daemon, started on that database, migrates
    it with its own workers, under its own lock, and the commands work beside it."""
    db_path = tmp_path / "courierd.db"  # the harness's daemon's
    store_env = {"COURIERD_STORE__PATH": str(db_path)}
    SqliteDatabase(db_path, migrations=SQLITE_MIGRATIONS[:9]).close()
    holder = subprocess.Popen(  # another process, as the daemon is to a shell's command
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from courierd.daemonlock import DaemonLock; "
            "DaemonLock(Path(sys.argv[1])).acquire(); print('held', flush=True); "
            "sys.stdin.read()",
            str(db_path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        refused = cli("outbox", "status", env=store_env)
        assert refused.code == 1, refused
        assert f"pid {holder.pid}" in refused.err and "restart it first" in refused.err
        with contextlib.closing(sqlite3.connect(db_path)) as conn:
            assert conn.execute("PRAGMA user_version").fetchone() == (9,)
        # A copy needs no migration: taken read-only, beside the old daemon.
        copy = tmp_path / "before-upgrade.db"
        assert cli("backup", str(copy), env=store_env).code == 0
        with contextlib.closing(sqlite3.connect(copy)) as conn:
            assert conn.execute("PRAGMA user_version").fetchone() == (9,)
            assert conn.execute("SELECT count(*) FROM outbox").fetchone() == (0,)
        with contextlib.closing(sqlite3.connect(db_path)) as conn:
            assert conn.execute("PRAGMA user_version").fetchone() == (9,)
    finally:
        holder.kill()
        holder.wait()
    broker = Broker(tmp_path / "broker").start()
    try:
        daemon = _daemon(tmp_path, broker, onetablet)
        with contextlib.closing(sqlite3.connect(db_path)) as conn:
            assert conn.execute("PRAGMA user_version").fetchone() == (len(SQLITE_MIGRATIONS),)
        done = cli("outbox", "status", env=store_env)
        assert done.code == 0, done.err
        assert daemon.stop() == 0
    finally:
        broker.stop()


@pytest.fixture
def small_tmp(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs, standing in for a small /var/tmp (root only)."""
    with tmpfs(tmp_path / "small-tmp") as mount:
        yield mount


def _legacy_database_in_use(db_path: Path, megabytes: int) -> None:
    """A legacy database holding `megabytes` of live rows besides its freed pages."""
    _legacy_database(db_path)
    with contextlib.closing(sqlite3.connect(db_path)) as conn, conn:
        conn.executemany(
            "INSERT INTO dead_letters (topic, payload, reason, received_at) VALUES (?, ?, ?, ?)",
            [("couriers/c1/status", b"y" * (1 << 20), "bad_json", "2026-01-01")] * megabytes,
        )


def test_compact_rewrites_beside_the_database_not_in_a_small_tmp(
    cli: Cli, db_path: Path, small_tmp: Path
) -> None:
    """VACUUM builds its copy in SQLite's temporary folder (TMPDIR, else /var/tmp), often a
    small file system: compact has it built beside the database, where it checked the
    room, so a database larger than /var/tmp compacts (it failed "disk is full")."""
    _legacy_database_in_use(db_path, 24)
    done = cli("compact", env={"TMPDIR": str(small_tmp)})
    assert done.code == 0, done.err
    assert "auto-vacuum none -> incremental" in done.out


def test_compact_refuses_a_temporary_folder_without_room(
    cli: Cli, db_path: Path, small_tmp: Path
) -> None:
    """A temporary folder the operator chose (SQLITE_TMPDIR) is kept, and checked: too
    small, and compact refuses before it starts, naming it; the file is untouched."""
    _legacy_database_in_use(db_path, 24)
    before = db_path.read_bytes()
    refused = cli("compact", env={"SQLITE_TMPDIR": str(small_tmp)})
    assert refused.code == 1
    assert "SQLite's temporary folder" in refused.err and str(small_tmp) in refused.err
    assert db_path.read_bytes() == before

"""What the daemon must survive in operation: a second daemon, no broker at boot, a full
disk, a locked database, a hung OneTablet at stop, stalled loops, a broken notify socket,
and months of data (CONTRACT.md 4.12, 4.13, 4.15, section 6)."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from courierd.domain.model import Status, StatusEvent
from tests.conftest import Cli
from tests.harness import Rig, delivered, statuses, tmpfs, wait_until

pytestmark = pytest.mark.integration


class NotifySocket:
    """A stand-in for systemd's notify socket, collecting (time, message) in the background."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.got: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                self.got.append((time.monotonic(), self.sock.recv(500).decode()))

    def count(self, what: str, since: float = 0.0) -> int:
        return sum(1 for t, m in list(self.got) if t >= since and what in m)

    def last(self, what: str) -> float:
        """When the latest message containing `what` arrived (monotonic; 0 if none)."""
        return max((t for t, m in list(self.got) if what in m), default=0.0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def test_a_second_daemon_on_the_same_database_refuses_to_start(sqlite_rig: Rig, cli: Cli) -> None:
    """One daemon per database (4.13): the second exits 1 with one line naming the
    holder; order commands keep working beside the first."""
    rig = sqlite_rig
    first = rig.daemon().start()
    second = rig.daemon()
    second.log = rig.dir / "second.log"
    second.start(wait_ready=False)
    assert second.proc is not None and second.proc.wait(20) == 1
    lines = second.log.read_text().strip().splitlines()
    assert len(lines) == 1 and "another courierd daemon" in lines[0], lines
    assert str(first.proc.pid) in lines[0]  # type: ignore[union-attr]
    env = {"COURIERD_STORE__PATH": str(rig.dir / "courierd.db")}
    assert cli("outbox", "status", env=env).code == 0
    assert first.health()[0] == 200
    assert first.stop() == 0


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_a_second_daemon_through_a_link_to_the_database_refuses_to_start(
    sqlite_rig: Rig, link: str
) -> None:
    """The lock is the file's, not its spelling's: a daemon started on a symlink or a
    hard link to the first daemon's database exits 1 with one line naming the holder."""
    rig = sqlite_rig
    first = rig.daemon().start()
    alias = rig.dir / "alias.db"
    if link == "symlink":
        alias.symlink_to(rig.dir / "courierd.db")
    else:
        os.link(rig.dir / "courierd.db", alias)
    second = rig.daemon(COURIERD_STORE__PATH=str(alias))
    second.log = rig.dir / "second.log"
    second.start(wait_ready=False)
    assert second.proc is not None and second.proc.wait(20) == 1
    lines = second.log.read_text().strip().splitlines()
    assert len(lines) == 1 and "another courierd daemon" in lines[0], lines
    assert f"pid {first.proc.pid}" in lines[0]  # type: ignore[union-attr]
    assert first.health()[0] == 200
    assert first.stop() == 0


def test_starts_without_the_broker_and_connects_when_it_comes(
    rig: Rig, notify: NotifySocket
) -> None:
    """With the broker down at boot (4.15): READY once the database is open, the outbox
    is delivered, health is 503 with mqtt disconnected; when the broker is back,
    courierd connects and events flow."""
    s = rig.store()
    s.writer.commit([StatusEvent("e1", "queued", "c1", Status.ARRIVING_AT_STORE)], now=time.time())
    s.close()
    rig.broker.stop()
    daemon = rig.daemon(NOTIFY_SOCKET=str(notify.path)).start(wait_ready=False)
    wait_until(lambda: notify.count("READY=1"), 20, "READY=1 without a broker")
    assert rig.onetablet.wait_for(lambda _: len(delivered(rig.onetablet).get("queued", [])) == 2)
    # (a cluster member first says it waits for its share of the sessions)
    wait_until(lambda: "mqtt: disconnected" in str(daemon.health()[1]["reasons"]), 10, "reason")
    code, body = daemon.health()
    assert code == 503 and body["mqtt"] == "disconnected"
    assert "mqtt: disconnected" in body["reasons"][0]
    rig.broker.start()
    wait_until(lambda: daemon.health()[0] == 200, 40, "the daemon to connect")
    pub = rig.publisher()
    pub.status("c1", "e2", "queued", "arrived_at_store")
    assert rig.onetablet.wait_for(lambda _: len(delivered(rig.onetablet)["queued"]) == 3, 10)
    pub.close()
    assert daemon.stop() == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs of our own, so the disk can really fill up (root only)."""
    with tmpfs(tmp_path / "disk") as mount:
        yield mount


def fill(disk: Path) -> Path:
    """Write a file until the disk is full; returns it (delete it to free the space)."""
    filler = disk / "filler"
    with filler.open("wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * (1 << 20))
            f.flush()
    return filler


def test_a_full_disk_turns_health_red_then_ingest_resumes(
    sqlite_rig: Rig, small_disk: Path
) -> None:
    """Disk full: health 503 naming the database, nothing acknowledged, no exit and no
    crash loop; when space returns, the waiting events are committed and pushed."""
    rig = sqlite_rig
    daemon = rig.daemon(COURIERD_STORE__PATH=str(small_disk / "courierd.db")).start()
    pub = rig.publisher()
    pub.status("c1", "f1", "full", "dasher_confirmed")
    assert rig.onetablet.wait_for(lambda _: "full" in delivered(rig.onetablet), 10)
    # Its delivery recorded too: a result the full disk refused is sent again once space
    # returns (at least once, the same Idempotency-Key), a fourth request here.
    wait_until(
        lambda: daemon.metric('courierd_pushes_total{outcome="delivered"}') == 1,
        10,
        "the first delivery recorded",
    )
    filler = fill(small_disk)
    for i, st in enumerate(["arriving_at_store", "arrived_at_store"], start=2):
        pub.status("c1", f"f{i}", "full", st, pad="x" * 20_000)  # WAL pages need room
    wait_until(lambda: daemon.health()[0] == 503, 20, "health to report the full disk")
    body = daemon.health()[1]
    assert body["database"] == "unavailable"
    assert any(r.startswith("database:") and "full" in r for r in body["reasons"]), body
    assert daemon.metric("courierd_database_ok") == 0
    assert len(delivered(rig.onetablet)["full"]) == 1
    filler.unlink()
    assert rig.onetablet.wait_for(lambda _: len(delivered(rig.onetablet)["full"]) == 3, 45)
    assert statuses(delivered(rig.onetablet)["full"]) == [
        "dasher_confirmed",
        "arriving_at_store",
        "arrived_at_store",
    ]
    wait_until(lambda: daemon.health()[0] == 200, 10, "health to recover")
    pub.close()
    assert daemon.stop() == 0


def test_a_write_lock_held_past_the_busy_timeout_is_waited_out(sqlite_rig: Rig) -> None:
    """An operator's shell holding the write lock longer than busy_timeout: ingest retries
    (health says why) and commits once the lock is gone; the daemon never exits."""
    rig = sqlite_rig
    daemon = rig.daemon(COURIERD_STORE__BUSY_TIMEOUT_S="0.2").start()
    shell = sqlite3.connect(rig.dir / "courierd.db", isolation_level=None)
    shell.execute("BEGIN IMMEDIATE")
    pub = rig.publisher()
    pub.status("c1", "l1", "locked", "dasher_confirmed")
    wait_until(lambda: daemon.health()[0] == 503, 15, "health to report the lock")
    assert "database:" in daemon.health()[1]["reasons"][0]
    assert "locked" not in delivered(rig.onetablet)
    shell.execute("ROLLBACK")
    shell.close()
    assert rig.onetablet.wait_for(lambda _: "locked" in delivered(rig.onetablet), 20)
    wait_until(lambda: daemon.health()[0] == 200, 10, "health to recover")
    pub.close()
    assert daemon.stop() == 0


def test_stop_has_one_deadline_even_when_onetablet_hangs(rig: Rig) -> None:
    """SIGTERM while a push hangs on OneTablet: the daemon still exits within its stop
    deadline (well under TimeoutStopSec), leaving no process behind; the push stays
    pending and goes out after the restart."""
    arrived, hang = threading.Event(), threading.Event()

    def hang_up(_: object) -> None:
        arrived.set()
        hang.wait(120)

    rig.onetablet.responder = hang_up
    daemon = rig.daemon(COURIERD_DAEMON__STOP_TIMEOUT_S="6").start()
    pub = rig.publisher()
    pub.status("c1", "h1", "hung", "dasher_confirmed")
    assert arrived.wait(10), "the push never reached OneTablet"
    # OneTablet hangs for 120 s: exiting before systemd's TimeoutStopSec (45 s) while it
    # still hangs is only possible through the daemon's own stop deadline.
    assert daemon.stop(timeout=40) == 0
    assert not hang.is_set()
    hang.set()
    rig.onetablet.responder = None
    rig.daemon().start()
    assert rig.onetablet.wait_for(lambda _: "hung" in delivered(rig.onetablet), 15)
    pub.close()


def test_stop_has_one_deadline_even_when_ingest_hangs_mid_send(sqlite_rig: Rig) -> None:
    """SIGTERM while the ingest process hangs (SIGSTOP) and the batcher is sending it a
    batch larger than the pipe's buffer (five payloads of 60 KB), so that the send waits
    for a read that never comes: the daemon still exits within its stop deadline (the
    ingest process killed at it), leaving no process behind. Nothing was acknowledged,
    so after a restart every message is committed."""
    rig = sqlite_rig
    batch = 5
    daemon = rig.daemon(
        COURIERD_INGEST__BATCH_SIZE=str(batch), COURIERD_DAEMON__STOP_TIMEOUT_S="3"
    ).start()
    os.kill(daemon.workers()["ingest"], signal.SIGSTOP)
    pub = rig.publisher()
    for n in range(3 * batch):
        pub.publish(f"couriers/c{n:02d}/location", b"x" * 60_000)
    pub.close()
    wait_until(
        lambda: daemon.metric("courierd_mqtt_inflight_messages") >= 2 * batch,
        15,
        "a batch in hand and the window waiting",
    )
    # Past the deadline the ingest process is killed: its batcher's pipe ends, fatally.
    assert daemon.stop(timeout=30) == 1
    rig.daemon().start()
    with contextlib.closing(sqlite3.connect(rig.dir / "courierd.db")) as db:
        wait_until(
            lambda: db.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 3 * batch,
            20,
            "every message committed after the restart",
        )


def test_a_stalled_loop_turns_health_red_and_stops_watchdog_pings(
    sqlite_rig: Rig, notify: NotifySocket
) -> None:
    """A worker that stops turning (SIGSTOP) makes /healthz 503 naming the loop and stops
    the WATCHDOG=1 pings, so systemd restarts the daemon; when it turns again, both
    recover."""
    rig = sqlite_rig
    daemon = rig.daemon(
        NOTIFY_SOCKET=str(notify.path),
        WATCHDOG_USEC="1000000",
        COURIERD_DAEMON__STALL_AFTER_S="2",
    ).start()
    wait_until(lambda: notify.count("WATCHDOG=1") >= 2, 10, "watchdog pings")
    pub = rig.publisher()
    for name, what in (("ingest", "ingest: batcher loop stalled"), ("dispatch", "dispatch:")):
        pid = daemon.workers()[name]
        os.kill(pid, signal.SIGSTOP)
        try:
            pub.status("c1", f"s-{name}", f"stall-{name}", "dasher_confirmed")
            wait_until(lambda: daemon.health()[0] == 503, 15, f"health to see {name} stall")
            assert any(what in r for r in daemon.health()[1]["reasons"])
            # Pings every 0.5 s would keep this false: it turns true only when the last
            # ping is older than twice systemd's 1 s watchdog timeout (which then fires).
            wait_until(
                lambda: time.monotonic() - notify.last("WATCHDOG=1") > 2.0,
                15,
                f"the watchdog pings to stop while {name} is stalled",
            )
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_until(lambda: daemon.health()[0] == 200, 15, f"health after {name} resumes")
        resumed = time.monotonic()
        wait_until(functools.partial(notify.count, "WATCHDOG=1", since=resumed), 5, "pings again")
    assert rig.onetablet.wait_for(
        lambda _: {"stall-ingest", "stall-dispatch"} <= set(delivered(rig.onetablet)), 10
    )
    pub.close()
    assert daemon.stop() == 0


def test_an_unusable_notify_socket_does_not_stop_the_daemon(
    sqlite_rig: Rig, tmp_path: Path
) -> None:
    """NOTIFY_SOCKET pointing nowhere (systemd restarting): notify fails, the daemon runs."""
    rig = sqlite_rig
    daemon = rig.daemon(NOTIFY_SOCKET=str(tmp_path / "gone.sock"), WATCHDOG_USEC="400000").start()
    pub = rig.publisher()
    pub.status("c1", "n1", "notify", "dasher_confirmed")
    assert rig.onetablet.wait_for(lambda _: "notify" in delivered(rig.onetablet), 10)
    assert "systemd.notify_failed" in daemon.log.read_text()
    pub.close()
    assert daemon.stop() == 0


def test_retention_prunes_finished_orders_while_running(rig: Rig, cli: Cli) -> None:
    """With a short retention, a finished order disappears while the daemon runs; an order
    whose push OneTablet keeps refusing (parked) stays, however old."""
    rig.onetablet.responder = lambda r: (
        (400, {}, {"error": "Bad Request", "message": "no"}) if r.order_id == "kept" else None
    )
    # 0.00005 days = 4.3 s: pruned at least every 1.1 s (retention / 4).
    daemon = rig.daemon(COURIERD_STORE__RETENTION_DAYS="0.00005").start()
    pub = rig.publisher()
    pub.status("c1", "r1", "gone", "dropoff")
    pub.status("c1", "r2", "kept", "dropoff")
    pub.publish("couriers/c1/status", b"{junk")
    assert rig.onetablet.wait_for(lambda _: "gone" in delivered(rig.onetablet), 10)
    s = rig.store()  # polled directly: a `courierd order show` a poll costs a second of CPU

    def known(order: str) -> bool:
        return bool(s.db.value("SELECT count(*) FROM orders WHERE order_id = ?", (order,)))

    def pruned_orders() -> int:  # what the daemon's retention says it deleted, in all
        text = daemon.log.read_text()
        return sum(int(n) for n in re.findall(r"retention\.pruned orders=(\d+)", text))

    # Delivered, so its row was committed (with its pushes, in one transaction); it may
    # already be pruned (4.3 s after its dropoff on a busy machine), so that it is gone
    # is not enough: retention must say it deleted it, and only it (kept is parked).
    wait_until(lambda: not known("gone"), 40, "pruning")
    wait_until(lambda: pruned_orders() >= 1, 10, "retention.pruned orders=1 in the log")
    assert pruned_orders() == 1
    env = rig.store_env
    assert cli("order", "show", "gone", env=env).code == 1
    assert cli("order", "show", "kept", env=env).code == 0  # its push is parked, not pruned
    # The junk was committed at about gone's time: pruned then, or next pass.
    wait_until(lambda: s.db.value("SELECT count(*) FROM dead_letters") == 0, 10, "junk pruned")
    assert s.db.value("SELECT count(*) FROM processed_events WHERE order_id = 'gone'") == 0
    s.close()
    pub.close()
    assert daemon.stop() == 0

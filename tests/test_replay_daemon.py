"""`courierd replay` against what the running daemon decided (CONTRACT.md 13): real tracks
through Mosquitto and the daemon, then the real command, on each store backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from courierd.domain.model import iso
from tests.harness import Rig, delivered, statuses, wait_until
from tests.test_replay import STORE, a_delivery

pytestmark = pytest.mark.integration
HOME = (40.7200, -74.0300)
ORDERS = ("r-1", "r-2")
# What replay must leave alone (the daemon's own heartbeat rows are not its business).
TABLES = ("orders", "transitions", "outbox", "track_points", "processed_events", "stores")


def courierd(rig: Rig, *args: str) -> Any:
    """The real command, configured like the daemon; its JSON output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COURIERD_")}
    proc = subprocess.run(
        [sys.executable, "-m", "courierd", *args],
        capture_output=True,
        env={**env, **rig.store_env},
        cwd=rig.dir,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)


def rows(rig: Rig) -> dict[str, list[tuple[Any, ...]]]:
    s = rig.store()
    try:
        return {t: sorted(map(tuple, s.db.rows(f"SELECT * FROM {t}")), key=repr) for t in TABLES}
    finally:
        s.close()


def undelivered(rig: Rig) -> int:
    s = rig.store()
    try:
        return int(s.db.value("SELECT count(*) FROM outbox WHERE state <> 'delivered'"))
    finally:
        s.close()


def by_order(report: Any) -> dict[str, dict[str, tuple[str | None, str | None]]]:
    return {
        o["order_id"]: {s["status"]: (s["was"], s["would_be"]) for s in o["statuses"]}
        for o in report["orders"]
    }


def test_replay_gives_back_what_the_daemon_decided_and_touches_nothing(rig: Rig) -> None:
    """Two deliveries driven by fixes through the daemon: replay (run while the daemon
    runs) gives every geofence status at the time decided live; a smaller approach_m
    moves only arriving_at_store, later; neither replay writes a row or sends a push."""
    # One MQTT session (a PostgreSQL instance otherwise holds 4 slots' shared sessions),
    # so that a status sent after the fixes is ingested after them (see below).
    rig.daemon(COURIERD_CLUSTER__SLOTS="1").start()
    pub = rig.publisher()
    for n, oid in enumerate(ORDERS):
        pub.publish(
            "dispatch/assignments",
            {
                "order_id": oid,
                "courier_id": f"c{n}",
                "pickup": {"lat": STORE[0], "lng": STORE[1], "radius_m": 80},
                "dropoff": {"lat": HOME[0], "lng": HOME[1]},
            },
        )
        pub.status(f"c{n}", f"g{n}", oid, "dasher_confirmed")
    assert rig.onetablet.wait_for(lambda _: all(o in delivered(rig.onetablet) for o in ORDERS))
    t0 = time.time() - 3600
    for n, _ in enumerate(ORDERS):
        for t, lat, lng in a_delivery(t0 + 7 * n):  # buffered fixes, sent late
            pub.publish(
                f"couriers/c{n}/location", {"ts": iso(t), "lat": lat, "lng": lng, "accuracy_m": 5}
            )
    assert rig.onetablet.wait_for(
        lambda _: all(len(delivered(rig.onetablet).get(o, [])) == 4 for o in ORDERS)
    )
    # Fixes after the dropoff may still be on their way in: a status sent after them,
    # on the same connection, is ingested after them (one session, in order).
    pub.status("c8", "settled", "settled", "dasher_confirmed")
    assert rig.onetablet.wait_for(lambda _: "settled" in delivered(rig.onetablet))
    # The daemon records each push's result just after OneTablet has it.
    wait_until(lambda: undelivered(rig) == 0, 10, "the pushes' results")
    before, pushed = rows(rig), len(rig.onetablet.requests())

    same = by_order(courierd(rig, "replay", "--json"))
    assert sorted(same) == list(ORDERS)
    for oid in ORDERS:
        assert set(same[oid]) == {
            "arriving_at_store",
            "arrived_at_store",
            "dasher_out_for_delivery",
        }
        for status, (was, would_be) in same[oid].items():
            assert was is not None and was == would_be, (oid, status)

    tuned = courierd(rig, "replay", "--json", "--set", "geofence.approach_m=300")
    for got in by_order(tuned).values():
        was, would_be = got["arriving_at_store"]
        assert was is not None and would_be is not None and would_be > was
        for status in ("arrived_at_store", "dasher_out_for_delivery"):
            assert got[status][0] == got[status][1]
    summary = tuned["summary"]
    assert summary["orders_replayed"] == 2 and summary["orders_changed"] == 2
    assert summary["statuses"]["arriving_at_store"]["median_shift_s"] > 0

    # Nothing written, nothing pushed: a sentinel sent after the replays is the only
    # request OneTablet gets.
    assert rows(rig) == before
    pub.status("c9", "sentinel", "sentinel", "dasher_confirmed")
    assert rig.onetablet.wait_for(lambda _: "sentinel" in delivered(rig.onetablet))
    late = rig.onetablet.requests()[pushed:]
    assert [(r.order_id, statuses([r])) for r in late] == [("sentinel", ["dasher_confirmed"])]
    pub.close()


def test_replay_leaves_the_sqlite_file_byte_for_byte(sqlite_rig: Rig) -> None:
    """With the daemon stopped, replay and stores suggest leave the database file byte
    for byte as it was, and write nothing to its WAL (opened read-only)."""
    daemon = sqlite_rig.daemon().start()
    pub = sqlite_rig.publisher()
    pub.publish(
        "dispatch/assignments",
        {"order_id": "b-1", "courier_id": "c1", "pickup": {"lat": STORE[0], "lng": STORE[1]}},
    )
    for t, lat, lng in a_delivery(time.time() - 3600):
        pub.publish("couriers/c1/location", {"ts": iso(t), "lat": lat, "lng": lng})
    assert sqlite_rig.onetablet.wait_for(
        lambda _: len(delivered(sqlite_rig.onetablet).get("b-1", [])) == 4
    )
    pub.close()
    assert daemon.stop() == 0

    db = Path(sqlite_rig.dir) / "courierd.db"
    wal = db.with_name("courierd.db-wal")
    before = db.read_bytes()
    assert not wal.exists() or wal.stat().st_size == 0
    assert courierd(sqlite_rig, "replay", "--json", "--set", "geofence.dwell_s=10")["orders"]
    courierd(sqlite_rig, "stores", "suggest", "--json")
    assert db.read_bytes() == before
    # A WAL reader may create the (empty) WAL and its index; no page was written to it.
    assert not wal.exists() or wal.stat().st_size == 0

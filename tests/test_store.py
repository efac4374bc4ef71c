"""The store on a real database: batches are atomic, migrations, outbox claims, holds."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

from courierd.config import GeofenceSettings, StoreSettings
from courierd.daemon.ingest import _commit_isolating
from courierd.domain.geofence import Track
from courierd.domain.lifecycle import active_sql, finished_sql
from courierd.domain.memo import Memo
from courierd.domain.model import (
    Assignment,
    DeadLetter,
    LocationFix,
    Place,
    ProfileUpdate,
    Status,
    StatusEvent,
    Transition,
    dumps,
    iso,
)
from courierd.domain.planner import Effects, Snapshot
from courierd.errors import InputError, StoreError, StoreUnavailable
from courierd.store import Store, open_store
from courierd.store.outbox import CLAIM_SQL, PushResult
from courierd.store.queries import FAILED_PUSHES_SQL
from courierd.store.schema import DELIVERED, FAILED, PENDING, SQLITE_MIGRATIONS
from courierd.store.sqlite import SqliteDatabase
from courierd.store.writer import MEMO_SWEEP_S, BatchWriter, read_consumed, stored_consumed
from tests import pg
from tests.conftest import open_path

T0 = 1_700_000_000.0


def status(eid: str, order: str, st: Status, courier: str = "c1") -> StatusEvent:
    return StatusEvent(eid, order, courier, st)


def test_commit_batch_persists_everything_in_the_file(
    store: Store, store_settings: StoreSettings
) -> None:
    """Orders, transitions, pushes, dead letters, events, profile and latest fix survive reopen."""
    store.writer.commit(
        [
            ProfileUpdate("c1", {"full_name": "Mike"}),
            status("e1", "o1", Status.ARRIVING_AT_STORE),
            DeadLetter("couriers/c1/status", b"{", "bad_json", "payload is not JSON"),
            LocationFix("c1", "2024-01-01T00:00:02.000Z", 1.0, 2.0),
            LocationFix("c1", "2024-01-01T00:00:01.000Z", 1.0001, 2.0),  # older: taken first
        ],
        now=T0,
    )
    store.close()
    again = open_store(store_settings)
    view = again.queries.order_view("o1")
    assert view is not None
    assert view["state"] == "arriving_at_store" and view["courier_id"] == "c1"
    assert [(t["status"], t["inferred"]) for t in view["transitions"]] == [
        ("dasher_confirmed", True),
        ("arriving_at_store", False),
    ]
    assert [p["status"] for p in view["pushes"]] == ["dasher_confirmed", "arriving_at_store"]
    assert all(not p["delivered"] and p["attempts"] == 0 for p in view["pushes"])
    db = again.db
    body = db.value("SELECT body FROM outbox ORDER BY id")
    assert body == '{"delivery_status":"dasher_confirmed","courier_info":{"full_name":"Mike"}}'
    assert db.rows("SELECT reason, payload, size FROM dead_letters") == [("bad_json", b"{", 1)]
    assert db.rows("SELECT lat, lng FROM couriers") == [(1.0, 2.0)]
    assert db.rows("SELECT event_id, order_id FROM processed_events") == [("e1", "o1")]
    again.close()


def test_a_track_changed_behind_the_writer_is_read_from_its_row(store: Store) -> None:
    """The writer keeps each track it writes, so as not to parse it again on the next
    batch; a row someone else changed meanwhile is read as it is now, never as kept."""
    near = Place(40.0, -74.0, 100)
    store.writer.commit([Assignment("o1", "c1", b"{}", near, None)], now=T0)
    inside = [LocationFix("c1", iso(T0 + t), 40.0, -74.0, 5.0) for t in (0, 40, 80)]
    store.writer.commit([inside[0]], now=T0)  # arriving; one fix inside the radius
    assert store.db.value("SELECT state FROM orders") == "arriving_at_store"
    # An operator (or another instance) resets the rules' state: the streak is gone.
    with store.db.transaction():
        store.db.execute("UPDATE orders SET track = '{}'")
    store.writer.commit([inside[1]], now=T0 + 40)
    # Kept, the streak would have been 40 s and two fixes: arrived. Read: one fix.
    assert store.db.value("SELECT state FROM orders") == "arriving_at_store"
    store.writer.commit([inside[2]], now=T0 + 80)
    assert store.db.value("SELECT state FROM orders") == "arrived_at_store"


def test_an_order_row_changed_behind_the_writer_is_read_as_it_is_now(store: Store) -> None:
    """The writer keeps what each order row made (the order, its places) while the row
    reads the same; a row someone else changed meanwhile is read afresh."""
    far, there = Place(41.0, -74.0, 100), Place(40.0, -74.0, 100)
    store.writer.commit([Assignment("o1", "c1", b"{}", far, None)], now=T0)
    store.writer.commit([LocationFix("c1", iso(T0), 40.0, -74.0, 5.0)], now=T0)
    assert store.db.value("SELECT state FROM orders") == "new"  # 111 km away: nothing
    # An operator (or another instance) moves the pickup to where the courier is.
    with store.db.transaction():
        store.db.execute("UPDATE orders SET pickup_lat = ?", (there.lat,))
    store.writer.commit([LocationFix("c1", iso(T0 + 5), 40.0, -74.0, 5.0)], now=T0 + 5)
    assert store.db.value("SELECT state FROM orders") == "arriving_at_store"


def _fixes(courier: str, start: float, n: int) -> list[LocationFix]:
    """Accepted fixes 40 s apart, inside a pickup at (40, -74)."""
    return [LocationFix(courier, iso(start + 40 * i), 40.0, -74.0, 5.0) for i in range(n)]


def _snapshot(writer: BatchWriter, couriers: set[str], now: float) -> Snapshot:
    """What `writer` would read for a batch of fixes of `couriers` (nothing written)."""
    with writer.db.transaction():
        return writer.snapshot(set(), set(), set(couriers), set(couriers), now=now, seq=writer._seq)


def _order_reads(store: Store) -> list[str]:
    """Collects the statements that read order rows for the writer's snapshot (SQLite)."""
    seen: list[str] = []
    conn = store.db.conn  # type: ignore[attr-defined]
    conn.set_trace_callback(lambda sql: seen.append(sql) if "FROM orders AS o" in sql else None)
    return seen


def test_the_writer_reads_no_order_row_the_change_marker_vouches_for(sqlite_store: Store) -> None:
    """SQLite: once the writer has read a courier's active orders, its next batches take
    them from what it holds while nobody else wrote an order or a store; what it
    decides is what reading them would decide."""
    store = sqlite_store
    store.writer.commit([Assignment("o1", "c1", b"{}", Place(40.0, -74.0, 100), None)], now=T0)
    fixes = _fixes("c1", T0, 5)
    for fix in fixes[:2]:  # read (new to the writer), then read again after each transition
        store.writer.commit([fix], now=T0)
    assert store.db.value("SELECT state FROM orders") == "arrived_at_store"
    store.writer.commit([fixes[2]], now=T0 + 80)  # read: the batch before changed the order
    reads = _order_reads(store)
    seq = store.db.value("SELECT seq FROM changes WHERE name = 'orders'")
    for fix in fixes[3:]:
        store.writer.commit([fix], now=T0 + 160)
    assert reads == []
    # Its track rewrites (`track_rev`) skip the marker's trigger: a fix costs no move.
    assert store.db.value("SELECT seq FROM changes WHERE name = 'orders'") == seq
    assert store.db.value("SELECT consumed FROM orders") == f'[["c1","{fixes[0].ts}",5]]'
    fresh = BatchWriter(store.db, store.writer.geofence_rules)
    assert _snapshot(store.writer, {"c1"}, T0 + 200) == _snapshot(fresh, {"c1"}, T0 + 200)


# Writes by others (the API, expiry, holds, inbound events, retention, an operator, an
# older courierd): plain SQL that knows nothing of the change marker.
FOREIGN_WRITES = {
    "pickup moved": "UPDATE orders SET pickup_lat = 40.5, pickup_lng = -74",
    "cancelled": "UPDATE orders SET state = 'cancelled', updated_at = 'x'",
    "held": "UPDATE orders SET hold_until = 1e12",
    "track reset": "UPDATE orders SET track = '{}'",
    "segments reset": "UPDATE orders SET consumed = '[]'",
    "another order": "INSERT INTO orders (order_id, state, courier_id, updated_at, pickup_lat, "
    "pickup_lng) VALUES ('o2', 'dasher_confirmed', 'c1', 'x', 40.0, -74.0)",
    "deleted": "DELETE FROM orders",
    "store placed": "INSERT INTO stores VALUES ('s1', 40.0, -74.0, 50, 'x')",
}


@pytest.mark.parametrize("write", FOREIGN_WRITES.values(), ids=FOREIGN_WRITES.keys())
def test_a_write_by_anyone_else_makes_the_writer_read_its_orders_again(
    store: Store, store_settings: StoreSettings, write: str
) -> None:
    """Whatever another connection writes to an order or a store, however it writes it
    (an instance or a tool that predates the change marker included), the writer's next
    snapshot is exactly what a writer holding nothing reads."""
    writer = store.writer
    writer.commit([Assignment("o1", "c1", b"{}", None, None)], now=T0)
    with store.db.transaction():  # a store's place for the order (its pickup is none)
        store.db.execute("UPDATE orders SET store_id = 's1', dropoff_lat = 41, dropoff_lng = -74")
        store.db.execute("INSERT INTO stores VALUES ('s0', 1, 1, 1, 'x')")
    for fix in _fixes("c1", T0, 2):
        writer.commit([fix], now=T0 + 40)
    other = open_store(store_settings)  # another process
    try:
        with other.db.transaction():
            other.db.execute(write)
    finally:
        other.close()
    fresh = BatchWriter(store.db, writer.geofence_rules)
    assert _snapshot(writer, {"c1"}, T0 + 100) == _snapshot(fresh, {"c1"}, T0 + 100)


def test_without_its_change_marker_the_writer_reads_every_row_and_goes_on(
    sqlite_store: Store,
) -> None:
    """An operator who deletes the change marker's row costs reads, not ingest: batches
    still commit (every one of them failed before, and ingest stopped)."""
    store = sqlite_store
    store.writer.commit([Assignment("o1", "c1", b"{}", Place(40.0, -74.0, 100), None)], now=T0)
    store.db.execute("DELETE FROM changes")
    for fix in _fixes("c1", T0, 3):
        store.writer.commit([fix], now=T0 + 80)
    assert store.db.value("SELECT count(*) FROM track_points") == 3
    assert store.writer._known == {}


def test_a_batch_rolled_back_leaves_the_writer_reading_its_orders_again(
    sqlite_store: Store,
) -> None:
    """A batch whose transaction fails wrote nothing: what the writer noted of it is
    not taken for the rows' contents (the next batch reads them)."""
    store = sqlite_store
    writer = store.writer
    writer.commit([Assignment("o1", "c1", b"{}", Place(40.0, -74.0, 100), None)], now=T0)
    fixes = _fixes("c1", T0, 4)
    for fix in fixes[:3]:  # the last one changes nothing but the track: it is held
        writer.commit([fix], now=T0 + 80)
    store.db.execute(  # the batch fails after it rewrote the track
        "CREATE TRIGGER boom BEFORE INSERT ON track_points WHEN NEW.ts = ? "
        "BEGIN SELECT RAISE(ABORT, 'boom'); END".replace("?", f"'{fixes[3].ts}'")
    )
    with pytest.raises(sqlite3.IntegrityError):
        writer.commit([fixes[3]], now=T0 + 120)
    store.db.execute("DROP TRIGGER boom")  # DDL: the marker stays where it was
    fresh = BatchWriter(store.db, writer.geofence_rules)
    assert _snapshot(writer, {"c1"}, T0 + 130) == _snapshot(fresh, {"c1"}, T0 + 130)


def _everything(
    writer: BatchWriter, orders: set[str], couriers: set[str], now: float
) -> tuple[Snapshot, Snapshot]:
    """What `writer` would read for a batch of statuses of `orders`, and for one of fixes
    of `couriers` (nothing written). Apart: a courier's fix reads its active orders,
    which would hide what the writer holds of them for a status."""
    with writer.db.transaction():
        statuses = writer.snapshot(set(orders), set(), set(), set(), now=now, seq=writer._seq)
    return statuses, _snapshot(writer, couriers, now)


def _transitions(store: Store, order_id: str) -> list[tuple[str, int]]:
    return store.db.rows(
        "SELECT status, inferred FROM transitions WHERE order_id = ? ORDER BY id", (order_id,)
    )


def test_statuses_decided_from_what_the_writer_holds_are_decided_as_from_the_rows(
    store: Store,
) -> None:
    """The writer holds the order rows its own batches wrote (SQLite, while the change
    marker stands) instead of reading them back: after every batch (several statuses of
    one order in one, a batch broken by one message and committed message by message, an
    order held and then cancelled through the API meanwhile, its hold run out, a finished
    order's late status), what it would decide the next batch from (an order's status,
    a courier's active orders) is exactly what a writer holding nothing reads, and every
    order's history is its chain, each status once."""
    writer, outbox = store.writer, store.outbox
    d, a, r, o, x = (
        Status.DASHER_CONFIRMED,
        Status.ARRIVING_AT_STORE,
        Status.ARRIVED_AT_STORE,
        Status.DASHER_OUT_FOR_DELIVERY,
        Status.DROPOFF,
    )
    orders, couriers = {"o1", "o2", "o3", "o4"}, {"c1", "c2"}

    def same_as_read(now: float) -> None:
        fresh = BatchWriter(store.db, writer.geofence_rules)
        assert _everything(writer, orders, couriers, now) == _everything(
            fresh, orders, couriers, now
        )

    def batch(now: float, *inputs: StatusEvent | LocationFix) -> None:
        raw = [("couriers/c/status", b"{}", 2) for _ in inputs]
        _commit_isolating(store, raw, list(inputs), now)
        same_as_read(now)

    def fixes(now: float) -> list[LocationFix]:  # the couriers' active orders read
        return [LocationFix(c, iso(now), 40.0, -74.0, 5.0) for c in sorted(couriers)]

    batch(T0 - 10, *fixes(T0 - 10))  # (the first batch's sweep drops couriers with none)
    batch(
        T0,
        *fixes(T0),
        status("e1", "o1", d),
        status("e2", "o1", a),
        status("e3", "o2", a, "c2"),
    )
    batch(
        T0 + 1,
        status("e4", "o1", r),
        status("e5", "o1", a),  # stale
        status("e6", "o3", d),
        status("e3", "o2", a, "c2"),  # a duplicate
    )
    batch(  # broken by one message: committed one message at a time
        T0 + 2,
        status("e7", "o1", o),
        status("e\ud800", "o4", d, "c2"),
        status("e8", "o3", a),
        status("e9", "o1", x),
    )
    outbox.hold_for_cancel("o2", T0 + 3, 30.0)
    batch(T0 + 3, status("e10", "o2", r, "c2"), status("e11", "o3", r), status("e12", "o1", a))
    same_as_read(T0 + 60)  # the hold ran out meanwhile
    outbox.finish_cancel("o2", T0 + 61)
    batch(
        T0 + 62,
        status("e13", "o2", o, "c2"),  # cancelled
        status("e14", "o3", o, "c2"),  # the wrong courier
        status("e15", "o4", d, "c2"),
    )
    batch(T0 + 63, status("e16", "o3", x), status("e17", "o4", r, "c2"), *fixes(T0 + 63))
    chain = [(s.value, 0) for s in (d, a, r, o, x)]
    assert _transitions(store, "o1") == chain
    assert _transitions(store, "o2") == [(d.value, 1), (a.value, 0), (r.value, 0)]
    assert _transitions(store, "o3") == [*chain[:3], (o.value, 1), chain[4]]
    assert _transitions(store, "o4") == [(d.value, 0), (a.value, 1), (r.value, 0)]
    assert store.db.rows("SELECT order_id, state FROM orders ORDER BY order_id") == [
        ("o1", "dropoff"),
        ("o2", "cancelled"),
        ("o3", "dropoff"),
        ("o4", "arrived_at_store"),
    ]
    assert sorted(store.db.rows("SELECT reason FROM dead_letters")) == [
        ("cancelled",),
        ("unprocessable",),
        ("wrong_courier",),
    ]


def test_the_writer_reads_no_order_row_of_a_status_it_holds(sqlite_store: Store) -> None:
    """SQLite: an order's next status, while nobody but the writer wrote an order, is
    decided from what the writer holds of its row (no read); a row written by anyone
    else is read."""
    store = sqlite_store
    store.writer.commit([status("e1", "o1", Status.DASHER_CONFIRMED)], now=T0)
    store.writer.commit([status("e2", "o1", Status.ARRIVING_AT_STORE)], now=T0 + 1)
    reads = _order_reads(store)
    store.writer.commit([status("e3", "o1", Status.ARRIVED_AT_STORE)], now=T0 + 2)
    store.writer.commit([status("e4", "o2", Status.DASHER_CONFIRMED)], now=T0 + 3)
    assert [sql for sql in reads if "'o1'" in sql] == []
    store.db.execute("UPDATE orders SET ready_at = 'x' WHERE order_id = 'o1'")  # OneTablet
    store.writer.commit([status("e5", "o1", Status.DASHER_OUT_FOR_DELIVERY)], now=T0 + 4)
    assert len([sql for sql in reads if "'o1'" in sql]) == 1
    assert store.db.value("SELECT state FROM orders WHERE order_id = 'o1'") == (
        "dasher_out_for_delivery"
    )


def test_two_writers_taking_turns_on_one_order_each_read_the_other_s_status(
    store_settings: StoreSettings,
) -> None:
    """Two writers on one database (PostgreSQL: two instances; SQLite: two processes)
    take turns with the statuses of one order: each decides from the row as the other
    left it, never from what it wrote itself before; every status is recorded once."""
    one, two = open_store(store_settings), open_store(store_settings)
    try:
        for i, st in enumerate(Status):
            writer = (one, two)[i % 2].writer
            writer.commit([status(f"e{i}", "o1", st)], now=T0 + i)
        assert _transitions(one, "o1") == [(s.value, 0) for s in Status]
        assert one.db.value("SELECT count(*) FROM outbox") == len(Status)
    finally:
        one.close()
        two.close()


def test_the_writer_forgets_an_order_row_once_the_order_is_finished(store: Store) -> None:
    """What the writer keeps per order row (to skip rebuilding it) is dropped when the
    order finishes, and a finished order's row read again (a late duplicate) is not kept:
    finished orders do not fill the memo until it is cleared."""
    writer = store.writer
    writer.commit([status("a1", "o1", Status.ARRIVING_AT_STORE)], now=T0)
    writer.commit([status("b1", "o2", Status.ARRIVING_AT_STORE)], now=T0)
    writer.commit(  # each order's row read again (or, with a change marker, held): kept
        [status("a2", "o1", Status.ARRIVED_AT_STORE), status("b2", "o2", Status.ARRIVED_AT_STORE)],
        now=T0 + 1,
    )

    def kept() -> set[str]:
        return set(writer._rows) | set(writer._known)

    assert {"o1", "o2"} <= kept()
    writer.commit([status("a3", "o1", Status.DROPOFF)], now=T0 + 2)
    assert store.db.value("SELECT state FROM orders WHERE order_id = 'o1'") == "dropoff"
    assert "o1" not in kept() and "o2" in kept()
    writer.commit([status("a3", "o1", Status.DROPOFF)], now=T0 + 3)  # a late duplicate
    assert "o1" not in kept()


def _kept(store: Store, order_id: str) -> set[str]:
    """What the writer keeps of an order: its track's and consumed fixes' values for the
    text its row holds now, the order and places its row made."""
    writer = store.writer
    track, consumed = store.db.row(
        "SELECT track, consumed FROM orders WHERE order_id = ?", (order_id,)
    ) or (None, None)
    kept = set()
    if track is not None and writer._tracks.get(order_id, track) is not None:
        kept.add("track")
    if consumed is not None and writer._consumed.get(order_id, consumed) is not None:
        kept.add("consumed")
    if order_id in writer._rows:
        kept.add("row")
    return kept


def _geofenced(store: Store, order_id: str, courier: str, now: float) -> None:
    """An order with places its courier is far from, and two fixes: the writer keeps it."""
    far = Place(41.0, -74.0, 100)
    store.writer.commit([Assignment(order_id, courier, b"{}", far, far)], now=now)
    for t in (0, 5):
        store.writer.commit([LocationFix(courier, iso(now + t), 40.0, -74.0, 5.0)], now=now + t)


def test_the_rows_the_writer_holds_are_emptied_whole_past_its_bound(sqlite_store: Store) -> None:
    """The order rows the writer holds (so as not to read them again) are emptied whole
    once they and the rows a batch newly read would be more than its memos hold, as the
    memos are; rows it holds already, read again, are not counted twice."""
    writer = sqlite_store.writer
    writer._tracks = Memo(3)  # its bound
    for i in range(3):
        _geofenced(sqlite_store, f"o{i}", f"c{i}", T0)
    assert set(writer._known) == {"o0", "o1", "o2"}
    writer.commit([LocationFix("c0", iso(T0 + 10), 40.0, -74.0, 5.0)], now=T0 + 10)
    assert set(writer._known) == {"o0", "o1", "o2"}  # o0 was held: nothing new
    _geofenced(sqlite_store, "o3", "c3", T0 + 20)  # a fourth: over the bound
    assert set(writer._known) == {"o3"}


@pytest.mark.parametrize("update_from", [True, False])
def test_a_batch_writes_every_track_and_kept_fix_however_many(
    store: Store, update_from: bool
) -> None:
    """Every geofenced order's track and consumed fixes are rewritten, and every fix
    kept, whatever the batch's size (the writer puts many rows in one statement: here
    32 + 32 + 32 + 4 + 2 + 1), whether the batch read the order rows or held them; and so
    with an engine without UPDATE ... FROM (SQLite before 3.33), a row at a time."""
    store.db.update_from = update_from  # type: ignore[misc]
    n = 103
    far = Place(41.0, -74.0, 100)
    couriers = [f"c{i:03}" for i in range(n)]
    store.writer.commit(
        [Assignment(f"o{i:03}", c, b"{}", far, far) for i, c in enumerate(couriers)], now=T0
    )
    for k in (1, 2):  # rows read (the assignment wrote them), then held (SQLite)
        at = T0 + k
        store.writer.commit([LocationFix(c, iso(at), 40.0, -74.0, 5.0) for c in couriers], now=at)
        rows = store.db.rows("SELECT order_id, courier_id, track, consumed FROM orders")
        assert len(rows) == n
        for _, courier, track, consumed in rows:
            assert json.loads(track)["last"] == at
            assert json.loads(consumed) == [[courier, iso(T0 + 1), k]]
        kept = store.db.rows("SELECT courier_id, count(*) FROM track_points GROUP BY courier_id")
        assert sorted(kept) == [(c, k) for c in couriers]


def test_a_track_rewritten_without_consumed_fixes_keeps_those_stored(store: Store) -> None:
    """A new courier's assignment starts the order's track afresh and consumes no fix:
    its rewrite carries no consumed fixes (NULL; on PostgreSQL through the `VALUES` list
    of `UPDATE ... FROM`, where the NULL has no type of its own), and the segments
    stored stay, for replay, beside another order's in the same batch, which are
    written. The new courier's first fix then starts a segment of its own."""
    far = Place(41.0, -74.0, 100)
    store.writer.commit([Assignment(f"o{i}", f"c{i}", b"{}", far, far) for i in (1, 2)], now=T0)
    store.writer.commit(
        [LocationFix(f"c{i}", iso(T0 + 1), 40.0, -74.0, 5.0) for i in (1, 2)], now=T0 + 1
    )
    store.writer.commit(
        [Assignment("o1", "c3", b"{}", far, far), LocationFix("c2", iso(T0 + 2), 40.0, -74.0, 5.0)],
        now=T0 + 2,
    )

    def stored(order_id: str) -> tuple[dict[str, object], object]:
        row = store.db.row("SELECT track, consumed FROM orders WHERE order_id = ?", (order_id,))
        assert row is not None
        track, consumed = row
        return json.loads(track), json.loads(consumed)

    track, consumed = stored("o1")
    assert track.get("last") is None  # afresh
    assert consumed == [["c1", iso(T0 + 1), 1]]
    assert stored("o2")[1] == [["c2", iso(T0 + 1), 2]]
    store.writer.commit([LocationFix("c3", iso(T0 + 3), 40.0, -74.0, 5.0)], now=T0 + 3)
    assert stored("o1")[1] == [["c1", iso(T0 + 1), 1], ["c3", iso(T0 + 3), 1]]


def test_the_writer_forgets_a_finished_order_s_track_and_consumed_fixes(store: Store) -> None:
    """An order finished by a status the writer commits: nothing of it is kept (its row
    is not read again), not only its row's order and places."""
    _geofenced(store, "o1", "c1", T0)
    assert _kept(store, "o1") == {"track", "consumed", "row"}
    store.writer.commit([status("a1", "o1", Status.DROPOFF)], now=T0 + 10)
    assert store.db.value("SELECT state FROM orders") == "dropoff"
    assert _kept(store, "o1") == set()


def test_the_writer_forgets_orders_finished_behind_it(store: Store) -> None:
    """Orders cancelled (the API's cancel: hold, then finish) or expired outside the
    writer are never read by it again: what it kept of them goes once a sweep interval
    passed without a batch reading them, while an order read in every interval is kept.
    Without that, every such order stayed until the memo filled (about 1.5 KB each)."""
    writer = store.writer
    for order_id, courier in (("o1", "c1"), ("o2", "c2"), ("o3", "c3")):
        _geofenced(store, order_id, courier, T0)
        assert _kept(store, order_id) == {"track", "consumed", "row"}
    store.outbox.hold_for_cancel("o1", T0 + 10, 30.0)
    store.outbox.finish_cancel("o1", T0 + 11)
    later = T0 + store.expiry.abandon_after_s + 60
    writer.commit([LocationFix("c2", iso(later), 40.0, -74.0, 5.0)], now=later)  # o2 lives
    assert store.expiry.step(later) == ["o3"]
    for i in range(1, 3):  # two intervals, batches reading only o2
        at = later + i * MEMO_SWEEP_S
        writer.commit([LocationFix("c2", iso(at), 40.0, -74.0, 5.0)], now=at)
    assert store.db.rows("SELECT order_id, state FROM orders ORDER BY order_id") == [
        ("o1", "cancelled"),
        ("o2", "new"),
        ("o3", "expired"),
    ]
    assert _kept(store, "o1") == _kept(store, "o3") == set()
    assert _kept(store, "o2") == {"track", "consumed", "row"}


def test_the_writer_forgets_quiet_orders_it_need_not_read(store: Store) -> None:
    """With the change marker (SQLite) the writer holds each order's row so as not to read
    it; an order no batch read for a sweep interval is dropped from that too, and its
    courier's next fix reads the row again and carries on from it."""
    writer = store.writer
    _geofenced(store, "o1", "c1", T0)
    _geofenced(store, "o2", "c2", T0)
    assert ("o1" in writer._known) is store.db.change_marker
    for i in range(1, 3):  # two intervals, batches reading only o2
        at = T0 + i * MEMO_SWEEP_S
        writer.commit([LocationFix("c2", iso(at), 40.0, -74.0, 5.0)], now=at)
    assert "o1" not in writer._known and "c1" not in writer._known_active
    assert ("o2" in writer._known) is store.db.change_marker
    back = T0 + 3 * MEMO_SWEEP_S
    writer.commit([LocationFix("c1", iso(back), 40.0, -74.0, 5.0)], now=back)
    track = "SELECT track FROM orders WHERE order_id = ?"
    o1, o2 = (json.loads(store.db.value(track, (oid,))) for oid in ("o1", "o2"))
    assert o1 == {**o2, "last": back} and o2["last"] == T0 + 2 * MEMO_SWEEP_S


def test_consumed_fixes_as_stored_read_back_as_kept() -> None:
    """What the writer keeps beside the consumed segments it writes is what reading the
    text gives back; the text is the JSON encoder's, escapes and all."""
    for consumed in [
        (),
        (("c1", "2024-01-01T00:00:00.000Z", 1),),
        (('c"\\é\u2028\x01', "t", 7), ("c2", "u", 10**12)),
    ]:
        text, value = stored_consumed(consumed)
        assert text == dumps([list(segment) for segment in consumed])
        assert value == read_consumed(text)
    for odd in [(("c1", "t", 0),), (("c1", "t", True),), (("c1", 5, 1),)]:
        text, value = stored_consumed(odd)  # type: ignore[arg-type]
        assert value is None and text == dumps([list(segment) for segment in odd])
        with pytest.raises(ValueError):
            read_consumed(text)


def test_batch_fails_midway_nothing_lands(store: Store) -> None:
    """A failure after some rows were written rolls the whole batch back."""
    fx = store.writer.commit([status("e1", "o1", Status.DASHER_CONFIRMED)], now=T0)
    assert fx.pushes
    poisoned = Effects()
    poisoned.event_ids.add(("o2", "e2"))
    poisoned.transitions.append(Transition("o2", Status.DROPOFF, False, "e2", None))  # type: ignore[arg-type]
    with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)), store.db.transaction():
        store.writer.write(poisoned, Snapshot(), now=T0)
    assert store.outbox.get_order("o2") is None
    assert store.db.value("SELECT count(*) FROM processed_events") == 1
    # and the store is still usable afterwards
    store.writer.commit([status("e3", "o1", Status.ARRIVING_AT_STORE)], now=T0)
    assert store.outbox.get_order("o1").state == "arriving_at_store"  # type: ignore[union-attr]


def test_statuses_failing_midway_leave_no_transition_nor_event(store: Store) -> None:
    """A transition that cannot be written, in the middle of a statement of several (the
    writer's transitions go many rows a statement, and on SQLite with OR FAIL: a failing
    row does not undo the statement's earlier rows), fails the batch, and the rollback
    leaves none of it. The writer goes on afterwards."""
    n = 40  # transitions: a statement of 32 rows, then one of 8, which fails at its second
    oids = [f"o{i:03}" for i in range(n)]
    store.writer.commit(
        [status(f"e{i}", oid, Status.DASHER_CONFIRMED) for i, oid in enumerate(oids)], now=T0
    )

    def counts() -> list[object]:
        return [
            store.db.value(f"SELECT count(*) FROM {table}")
            for table in ("transitions", "outbox", "processed_events")
        ]

    before = counts()
    poisoned = Effects()
    for i, oid in enumerate(oids):
        poisoned.event_ids.add((oid, f"f{i}"))
        at = None if i == 33 else iso(T0 + 1)
        poisoned.transitions.append(
            Transition(oid, Status.ARRIVING_AT_STORE, False, f"f{i}", at)  # type: ignore[arg-type]
        )
    with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)), store.db.transaction():
        store.writer.write(poisoned, Snapshot(), now=T0 + 1)
    assert counts() == before
    store.writer.commit(
        [status(f"g{i}", oid, Status.ARRIVING_AT_STORE) for i, oid in enumerate(oids)],
        now=T0 + 2,
    )
    assert counts() == [2 * n, 2 * n, 2 * n]


def test_fixes_failing_midway_leave_no_track_nor_kept_fix(store: Store) -> None:
    """A kept fix that cannot be written, in the middle of a statement of several (the
    writer's tracks and kept fixes go many rows a statement, and on SQLite with OR FAIL:
    a failing row does not undo the statement's earlier rows), fails the batch, and the
    rollback leaves none of it: no kept fix, every track and its consumed fixes as they
    were. The writer goes on afterwards."""
    n = 40  # kept fixes: a statement of 32 rows, then one of 8, which fails at its second
    far = Place(41.0, -74.0, 100)
    couriers = [f"c{i:03}" for i in range(n)]
    store.writer.commit(
        [Assignment(f"o{i:03}", c, b"{}", far, far) for i, c in enumerate(couriers)], now=T0
    )
    store.writer.commit(
        [LocationFix(c, iso(T0 + 1), 40.0, -74.0, 5.0) for c in couriers], now=T0 + 1
    )
    before = store.db.rows("SELECT order_id, track, consumed FROM orders ORDER BY order_id")
    assert store.db.value("SELECT count(*) FROM track_points") == n
    poisoned = Effects()
    for i, c in enumerate(couriers):
        fix = LocationFix(c, iso(T0 + 2), 40.0, -74.0, 5.0)
        poisoned.tracks[f"o{i:03}"] = Track(T0 + 2)
        poisoned.consumed[f"o{i:03}"] = ((c, iso(T0 + 1), 2),)
        poisoned.track_points.append(replace(fix, lat=None) if i == 33 else fix)  # type: ignore[arg-type]
    with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)), store.db.transaction():
        store.writer.write(poisoned, Snapshot(), now=T0 + 2)
    assert store.db.value("SELECT count(*) FROM track_points") == n
    assert store.db.rows("SELECT order_id, track, consumed FROM orders ORDER BY order_id") == before
    store.writer.commit(
        [LocationFix(c, iso(T0 + 3), 40.0, -74.0, 5.0) for c in couriers], now=T0 + 3
    )
    assert store.db.value("SELECT count(*) FROM track_points") == 2 * n
    for courier, track, consumed in store.db.rows("SELECT courier_id, track, consumed FROM orders"):
        assert json.loads(track)["last"] == T0 + 3
        assert json.loads(consumed) == [[courier, iso(T0 + 1), 2]]


def test_migrations_on_empty_and_existing_database(tmp_path: Path) -> None:
    """An empty file is brought to the latest version; reopening keeps data and version."""
    path = tmp_path / "db.sqlite"
    sqlite3.connect(path).close()  # an existing, empty database file
    s = open_path(path)
    assert s.db.schema_version == len(SQLITE_MIGRATIONS)
    s.writer.commit([status("e1", "o1", Status.DASHER_CONFIRMED)], now=T0)
    s.close()
    s = open_path(path)
    assert s.db.schema_version == len(SQLITE_MIGRATIONS)
    assert s.outbox.get_order("o1") is not None
    assert s.db.rows("PRAGMA journal_mode") == [("wal",)]
    assert s.db.rows("PRAGMA synchronous") == [(2,)]  # 2 = FULL
    assert s.db.rows("PRAGMA auto_vacuum") == [(2,)]  # 2 = INCREMENTAL, for retention
    s.close()


def _upgraded(path: Path, version: int, *statements: str) -> Store:
    """A database of migration `version` with `statements` run on it, then opened as
    courierd opens it (migrated to the latest)."""
    old = SqliteDatabase(path, migrations=SQLITE_MIGRATIONS[:version])
    for statement in statements:
        old.execute(statement)
    old.close()
    s = open_path(path)
    assert s.db.schema_version == len(SQLITE_MIGRATIONS)
    return s


def test_upgrade_from_version_1_keeps_data(tmp_path: Path) -> None:
    """A database written by the first release is migrated in place; its rows survive."""
    s = _upgraded(
        tmp_path / "v1.db",
        1,
        "INSERT INTO orders (order_id, state, courier_id, updated_at) "
        "VALUES ('o1', 'arrived_at_store', 'c1', 'x')",
        "INSERT INTO processed_events (event_id) VALUES ('old-event')",
    )
    assert s.outbox.get_order("o1").state == "arrived_at_store"  # type: ignore[union-attr]
    fx = s.writer.commit([status("old-event", "o1", Status.DROPOFF)], now=T0)
    assert fx.counts["duplicate"] == 1  # event ids from before the upgrade still count
    s.close()


def test_legacy_event_ids_are_looked_up_only_while_there_are_any(tmp_path: Path) -> None:
    """Ids from before ids named their order (order id '') count for every order; a
    database with none left is not asked about them each batch, and one that has them
    still is."""
    s = open_path(tmp_path / "c.db")
    seen: list[str] = []
    s.db.conn.set_trace_callback(seen.append)  # type: ignore[attr-defined]
    s.writer.commit([status("e1", "o1", Status.DASHER_CONFIRMED)], now=T0)
    assert not [q for q in seen if "order_id = '' AND event_id IN" in q], seen
    s.db.execute("INSERT INTO processed_events (order_id, event_id) VALUES ('', 'old-event')")
    seen.clear()
    fx = s.writer.commit([status("old-event", "o1", Status.ARRIVED_AT_STORE)], now=T0 + 1)
    assert fx.counts["duplicate"] == 1
    assert [q for q in seen if "order_id = '' AND event_id IN" in q]
    s.close()


# The store's queries over orders, each with the partial index it must use.
_ORDER_QUERIES = (
    (
        "orders_active",
        f"SELECT order_id FROM orders AS o WHERE (o.courier_id IN (?, ?) AND "
        f"{active_sql('o.state')})",
        ("c1", "c2"),
    ),
    (
        "orders_idle",
        f"SELECT order_id FROM orders AS o WHERE {active_sql()} AND updated_at < ? "
        "AND hold_until IS NULL",
        ("2024",),
    ),
    (
        "orders_finished",
        f"SELECT order_id FROM orders AS o WHERE {finished_sql()} AND updated_at < ? "
        "AND hold_until IS NULL ORDER BY updated_at LIMIT 5",
        ("2024",),
    ),
)


def _plan(store: Store, sql: str, params: tuple[object, ...]) -> str:
    if store.db.dialect == "sqlite":
        return " ".join(r[3] for r in store.db.rows(f"EXPLAIN QUERY PLAN {sql}", params))
    with store.db.transaction():  # an empty table: only an index the query can use
        store.db.execute("SET LOCAL enable_seqscan = off")
        return " ".join(r[0] for r in store.db.rows(f"EXPLAIN {sql}", params))


def test_the_orders_partial_indexes_are_cheap_to_keep_and_used(store: Store) -> None:
    """Every transition writes `state`, which the orders' partial indexes name: SQLite
    evaluates their WHERE for each row written, and an IN list of three values costs
    it a temporary table each time. Spelled as comparisons (SQLite), and the queries
    spelled alike, each query still uses its index, on both engines (PostgreSQL keeps
    its `NOT IN` indexes and proves the one spelling from the other)."""
    for index, sql, params in _ORDER_QUERIES:
        assert index in _plan(store, sql, params), (index, _plan(store, sql, params))
    if store.db.dialect != "sqlite":
        return
    wheres = store.db.rows(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'orders' "
        "AND sql LIKE '%state%'"
    )
    assert sorted(name for name, _ in wheres) == ["orders_active", "orders_finished", "orders_idle"]
    assert not [name for name, sql in wheres if " IN (" in sql.upper()], wheres


def test_upgrade_to_the_respelled_indexes_keeps_them_serving(tmp_path: Path) -> None:
    """A database of migration 8 gets the respelled indexes, with its rows in them."""
    s = _upgraded(
        tmp_path / "v8.db",
        8,
        "INSERT INTO orders (order_id, state, courier_id, updated_at) VALUES "
        "('o1', 'picked_up', 'c1', '2023'), ('o2', 'dropoff', 'c1', '2023'), "
        "('o3', 'expired', 'c2', '2023')",
    )
    found = []
    for index, sql, params in _ORDER_QUERIES:
        assert index in _plan(s, sql, params)
        found.append(sorted(r[0] for r in s.db.rows(sql, params)))
    assert found == [["o1"], ["o1"], ["o2", "o3"]]
    s.close()


# Reads and writes of the outbox by order, as the store spells them (history, a
# cancel's outcome, retention), and the index each must search with.
_OUTBOX_BY_ORDER = (
    "SELECT status, state, attempts, last_error, idempotency_key FROM outbox "
    "WHERE order_id = ? ORDER BY id",
    "UPDATE outbox SET state = 'cancelled', last_error = ? WHERE order_id = ? "
    "AND state IN ('pending', 'failed', 'held')",
    "DELETE FROM outbox WHERE order_id IN (?)",
)


def _outbox_indexes(store: Store) -> dict[str, str | None]:
    return dict(
        store.db.rows(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'outbox'"
        )
    )


def test_upgrade_to_pushes_unique_by_order_and_status(tmp_path: Path) -> None:
    """SQLite tells pushes apart by order and status (the idempotency key is a function
    of the two), with one index that also serves every read by order: a database of
    migration 9 loses the indexes on the key's text and on (order_id, id), its pushes
    are kept, and a push of an order and status already there is not written again."""
    s = _upgraded(
        tmp_path / "v9.db",
        9,
        "INSERT INTO outbox (order_id, status, body, idempotency_key, state, attempts, "
        "next_attempt_at, created_at) VALUES ('o1', 'dasher_confirmed', '{}', 'k1', "
        "'delivered', 1, 0, 0), ('o1', 'arriving_at_store', '{}', 'k2', 'pending', 0, 0, 0)",
    )
    indexes = _outbox_indexes(s)
    assert "outbox_order_status" in indexes
    assert not [sql for sql in indexes.values() if sql and "idempotency_key" in sql], indexes
    assert "idx_outbox_order_id_id" not in indexes
    for sql in _OUTBOX_BY_ORDER:
        plan = _plan(s, sql, ("o1",) * sql.count("?"))
        assert "SEARCH outbox USING INDEX outbox_order_status" in plan, (sql, plan)
    # Pushes of the same order and status, one with another key (none is ever written:
    # the key is a function of the two), and one the planner wrote before: not again.
    fx = s.writer.commit([status("e1", "o2", Status.DASHER_CONFIRMED)], now=T0)
    assert len(fx.pushes) == 1
    again = Effects()
    again.pushes.extend(fx.pushes)
    again.pushes.append(replace(fx.pushes[0], idempotency_key="another"))
    with s.db.transaction():
        s.writer.write(again, Snapshot(), now=T0 + 1)
    rows = s.db.rows("SELECT order_id, status, idempotency_key FROM outbox ORDER BY id")
    assert [r[:2] for r in rows] == [
        ("o1", "dasher_confirmed"),
        ("o1", "arriving_at_store"),
        ("o2", "dasher_confirmed"),
    ]
    assert rows[2][2] == fx.pushes[0].idempotency_key
    s.close()


# What three builds of main between releases ran as their migration 10 (two reverted,
# one moved to 11; schema._sqlite_10): a database one of them opened is at 10.
_REVERTED_10 = {
    "swap": (
        "CREATE UNIQUE INDEX outbox_order_status ON outbox(order_id, status)",
        "DROP INDEX idx_outbox_idempotency_key",
        "DROP INDEX idx_outbox_order_id_id",
    ),
    "marker": (
        "DROP TRIGGER orders_insert_marker",
        "CREATE TRIGGER orders_insert_marker AFTER INSERT ON orders WHEN NEW.track_rev = 0 "
        "BEGIN UPDATE changes SET seq = seq + 1 WHERE name = 'orders'; END",
    ),
    "fixes": ("DROP INDEX track_points_recorded",),
}


@pytest.mark.parametrize("reverted", sorted(_REVERTED_10))
def test_a_database_at_a_reverted_migration_10_is_brought_to_the_latest(
    tmp_path: Path, reverted: str
) -> None:
    """Such a database is not taken for up to date, nor refused: it has the outbox's
    index (a push is written), and what its migration 10 changed is as migration 8
    made it."""
    fresh = open_path(tmp_path / "fresh.db")
    want: dict[str, str] = dict(
        fresh.db.rows("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'")
    )
    fresh.close()
    s = _upgraded(tmp_path / "v10.db", 9, *_REVERTED_10[reverted], "PRAGMA user_version = 10")
    fx = s.writer.commit([status("e1", "o1", Status.DASHER_CONFIRMED)], now=T0)
    assert len(fx.pushes) == 1
    assert s.outbox.claim_due(T0 + 1, 10)
    assert "outbox_order_status" in _outbox_indexes(s)
    triggers: dict[str, str] = dict(
        s.db.rows("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'")
    )
    assert triggers == want
    assert s.db.rows(
        "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'track_points_recorded'"
    )
    s.close()


def test_a_postgresql_database_at_the_reverted_migration_5_is_brought_to_the_latest() -> None:
    """A build of main between releases had a PostgreSQL migration 5 (dropping
    `track_points_recorded`), reverted: a database it opened is at 5. It is not refused
    as newer than this courierd, and gets its index back (migration 6)."""
    if (why := pg.available()) is not None:
        pytest.skip(why)
    from courierd.store.postgres import PostgresDatabase
    from courierd.store.schema import POSTGRES_MIGRATIONS

    with pg.database(from_template=False) as url:
        old = PostgresDatabase(url, migrations=POSTGRES_MIGRATIONS[:4])
        with old.transaction():
            old.execute("DROP INDEX track_points_recorded")
            old.execute("INSERT INTO schema_version (version) VALUES (5)")
        old.close()
        with open_store(StoreSettings(url=url)) as s:
            assert s.db.schema_version == len(POSTGRES_MIGRATIONS)
            assert s.db.value("SELECT to_regclass('track_points_recorded') IS NOT NULL")


def test_a_migrating_process_keeps_its_wal_when_another_process_comes_and_goes(
    tmp_path: Path,
) -> None:
    """Before migrating, the store asks whether a daemon holds the file (daemonlock.
    held_elsewhere). Closing a descriptor of the file would drop this process's SQLite
    locks on it: another process closing its last connection would then take the file
    for its own, checkpoint and delete the WAL under this one's later commits, which
    would be lost. So: a command's store migrates, another process opens and closes the
    file (a second command), the first writes on, and its writes are there for all."""
    path = tmp_path / "v9.db"
    s = _upgraded(path, 9)  # migrates: probes the daemon's lock first
    s.writer.commit([status("e1", "o1", Status.DASHER_CONFIRMED)], now=T0)
    count = (
        "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
        "print(c.execute('SELECT count(*) FROM transitions').fetchone()[0]); c.close()"
    )
    first = subprocess.run([sys.executable, "-c", count, str(path)], capture_output=True)
    assert first.stdout.split() == [b"1"], first
    s.writer.commit([status("e2", "o1", Status.ARRIVING_AT_STORE)], now=T0 + 1)
    assert path.with_name("v9.db-wal").exists()
    after = subprocess.run([sys.executable, "-c", count, str(path)], capture_output=True)
    assert after.stdout.split() == [b"2"], after
    s.close()


def test_the_failed_pushes_are_read_through_their_own_index(store: Store) -> None:
    """`courierd outbox failed` reads the pushes parked as failed (few, however large the
    outbox) in id order, through the partial index that holds only them, not by walking
    the outbox; and lists them as before."""
    if store.db.dialect == "sqlite":
        plan = _plan(store, FAILED_PUSHES_SQL, (5,))  # no step walks the outbox itself
        assert "SCAN outbox USING INDEX outbox_failed" in plan
        assert plan.count("SCAN outbox") == 1, plan
    for n, order in enumerate(("o1", "o2", "o3")):
        store.writer.commit([status(f"e{n}", order, Status.DASHER_CONFIRMED)], now=T0 + n)
    rows = store.outbox.claim_due(T0 + 10, 10)
    for row in rows[:2]:
        store.outbox.record_results(
            [PushResult(row.id, FAILED, T0 + 11, error="400 unknown store")]
        )
    failed = store.queries.failed_pushes(10)
    assert [(f["order_id"], f["last_error"]) for f in failed] == [
        ("o1", "400 unknown store"),
        ("o2", "400 unknown store"),
    ]
    assert [f["order_id"] for f in store.queries.failed_pushes(1)] == ["o1"]


def test_a_failing_migration_changes_nothing(tmp_path: Path) -> None:
    """Each migration is atomic with its version bump: a failure midway leaves no table
    behind (sqlite-utils must not commit inside Table.create)."""
    path = tmp_path / "db.sqlite"

    def broken(db: object) -> None:
        SQLITE_MIGRATIONS[0](db)  # type: ignore[arg-type]
        raise RuntimeError("disk on fire")

    with pytest.raises(StoreError, match="disk on fire"):
        SqliteDatabase(path, migrations=(broken,))
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone() == (0,)
    assert conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall() == []
    conn.close()


def test_newer_schema_refused(tmp_path: Path) -> None:
    """A database from a newer courierd is refused with an upgrade hint, not damaged."""
    path = tmp_path / "db.sqlite"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={len(SQLITE_MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this courierd"):
        open_path(path)


def test_corrupt_rows_dead_letter_the_events_that_need_them(store: Store) -> None:
    """An unknown state or a profile that is not JSON refuses only the events touching
    them (corrupt_row); the rest of the batch commits."""
    store.db.execute(
        "INSERT INTO orders (order_id, state, updated_at) VALUES ('o9', 'teleported', 'x')"
    )
    store.db.execute("INSERT INTO couriers (courier_id, profile) VALUES ('c2', '{not json')")
    fx = store.writer.commit(
        [
            status("e1", "o9", Status.DROPOFF),
            status("e2", "fresh", Status.DASHER_CONFIRMED, courier="c2"),
            StatusEvent(
                "e3", "other", "c2", Status.DASHER_CONFIRMED, courier_info={"full_name": "X"}
            ),
            status("e4", "fine", Status.DASHER_CONFIRMED),
        ],
        now=T0,
    )
    assert [d.reason for d in fx.dead_letters] == ["corrupt_row", "corrupt_row"]
    assert [p.order_id for p in fx.pushes] == ["other", "fine"]  # e3 carries its own info
    assert store.db.value("SELECT state FROM orders WHERE order_id = 'o9'") == "teleported"
    # A new retained profile repairs the courier.
    fx = store.writer.commit(
        [
            ProfileUpdate("c2", {"full_name": "Z"}),
            status("e5", "fresh", Status.DASHER_CONFIRMED, "c2"),
        ],
        now=T0,
    )
    assert [p.order_id for p in fx.pushes] == ["fresh"] and not fx.dead_letters


def test_unwritable_path_is_a_store_error(tmp_path: Path) -> None:
    """A database path that cannot be created is a clear StoreError."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot open database"):
        open_path(blocker / "sub" / "db.sqlite")


def test_a_write_through_a_read_only_store_is_a_store_error(
    store: Store, store_settings: StoreSettings
) -> None:
    """A write through a store opened read-only (replay, stores suggest, the API's reads)
    is a StoreError saying so, on either backend: not the driver's own exception, and
    not StoreUnavailable (no retry would help). Nothing is written."""
    store.writer.commit([status("e1", "o1", Status.ARRIVING_AT_STORE)], now=T0)
    with open_store(store_settings, readonly=True) as ro:
        with pytest.raises(StoreError, match="opened read-only") as plain:
            ro.db.execute("UPDATE orders SET state = 'cancelled'")
        assert not isinstance(plain.value, StoreUnavailable)
        refused = pytest.raises(StoreError, match="opened read-only")
        with refused as in_tx, ro.db.transaction():
            ro.db.executemany("DELETE FROM orders WHERE order_id = ?", [("o1",)])
        assert not isinstance(in_tx.value, StoreUnavailable)
        assert ro.db.rows("SELECT order_id, state FROM orders") == [("o1", "arriving_at_store")]


@pytest.mark.parametrize(
    "code",
    [
        sqlite3.SQLITE_READONLY_RECOVERY,
        sqlite3.SQLITE_READONLY_CANTINIT,
        sqlite3.SQLITE_READONLY_CANTLOCK,
        sqlite3.SQLITE_READONLY_DBMOVED,
    ],
)
def test_a_read_only_sqlite_store_failing_a_read_is_unavailable_not_refused(
    sqlite_store: Store, db_path: Path, code: int
) -> None:
    """Only a write refused as such (SQLITE_READONLY itself) is the read-only store's
    StoreError. The extended READONLY codes a plain read through mode=ro can get (the
    WAL needs recovery, the -shm cannot be set up or locked, the file was moved) are
    the database failing this time: StoreUnavailable, as on a read-write store."""
    with open_store(StoreSettings(path=db_path), readonly=True) as ro:
        db = ro.db
        assert isinstance(db, SqliteDatabase)
        conn = db.conn

        class Failing:
            def __init__(self, code: int, message: str) -> None:
                self.error = sqlite3.OperationalError(message)
                self.error.sqlite_errorcode = code

            def execute(self, *args: object) -> None:
                raise self.error

        try:
            db.conn = Failing(code, "attempt to write a readonly database")  # type: ignore[assignment]
            with pytest.raises(StoreUnavailable):
                db.execute("SELECT count(*) FROM orders")
            db.conn = Failing(sqlite3.SQLITE_READONLY, "attempt to write a readonly database")  # type: ignore[assignment]
            with pytest.raises(StoreError, match="opened read-only") as refused:
                db.execute("DELETE FROM orders")
            assert not isinstance(refused.value, StoreUnavailable)
        finally:
            db.conn = conn


def test_a_read_write_postgresql_store_on_a_read_only_server_is_unavailable() -> None:
    """The daemon's own (read-write) store landing on a read-only server (failover to a
    standby, default_transaction_read_only) is a database outage: StoreUnavailable, so
    the daemon retries and reconnects (CONTRACT.md 10), not the fatal StoreError of a
    store opened read-only. The session is dropped: the next use opens a new one, which
    writes once the server takes writes again."""
    if (why := pg.available()) is not None:
        pytest.skip(why)
    with pg.database() as url, open_store(StoreSettings(url=url)) as store:
        store.db.execute("SET default_transaction_read_only = on")  # this session only
        with pytest.raises(StoreUnavailable):
            store.db.execute("UPDATE orders SET state = 'cancelled'")
        store.writer.commit([status("e1", "o1", Status.ARRIVING_AT_STORE)], now=T0)  # anew

        with psycopg.connect(url, autocommit=True) as admin:
            dbname = admin.info.dbname
            # The whole server read-only from now on (new sessions), as a standby is.
            admin.execute(f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = on')
            store.db.execute("SET default_transaction_read_only = on")  # and this one
            with pytest.raises(StoreUnavailable), store.db.transaction():
                store.db.executemany("DELETE FROM orders WHERE order_id = ?", [("o1",)])
            with pytest.raises(StoreUnavailable):  # a new session, read-only too
                store.writer.commit([status("e2", "o1", Status.ARRIVED_AT_STORE)], now=T0)
            admin.execute(f'ALTER DATABASE "{dbname}" RESET default_transaction_read_only')
        store.writer.commit([status("e2", "o1", Status.ARRIVED_AT_STORE)], now=T0)
        assert store.db.rows("SELECT order_id, state FROM orders") == [("o1", "arrived_at_store")]


def _ids(rows: list) -> list[tuple[str, str]]:  # type: ignore[type-arg]
    return [(r.order_id, r.status) for r in rows]


def test_claims_head_of_each_order_only(store: Store) -> None:
    """Only the first pending push of each order is claimable; in-flight ones are skipped."""
    store.writer.commit(
        [status("a", "o1", Status.ARRIVED_AT_STORE), status("b", "o2", Status.DASHER_CONFIRMED)],
        now=T0,
    )
    out = store.outbox
    assert out.claim_due(T0 - 1, limit=10) == []  # nothing due before it was created
    rows = out.claim_due(T0, limit=10)
    assert _ids(rows) == [("o1", "dasher_confirmed"), ("o2", "dasher_confirmed")]
    out.unclaim([rows[1].id])  # o1's push stays in flight; o2's was given back
    assert _ids(out.claim_due(T0, limit=10, busy=[rows[0].id])) == [("o2", "dasher_confirmed")]

    out.record_results([PushResult(rows[0].id, DELIVERED, T0)])
    out.unclaim([rows[1].id])
    assert _ids(out.claim_due(T0, 10)) == [
        ("o1", "arriving_at_store"),
        ("o2", "dasher_confirmed"),
    ]


def test_retry_failure_and_cancel_states(store: Store) -> None:
    """A retry waits until its time; a parked failure blocks the order; cancel drops pushes."""
    store.writer.commit([status("a", "o1", Status.ARRIVING_AT_STORE)], now=T0)
    out = store.outbox
    head = out.claim_due(T0, 10)[0]
    out.record_results([PushResult(head.id, PENDING, T0, T0 + 5, "503 busy")])
    assert out.claim_due(T0 + 4, 10) == []
    assert _ids(out.claim_due(T0 + 5, 10)) == [("o1", "dasher_confirmed")]
    out.record_results([PushResult(head.id, FAILED, T0 + 5, None, "400 bad courier_info")])
    assert out.claim_due(T0 + 100, 10) == []  # the second push waits behind the failure
    assert out.stats() == (1, T0, 1)
    view = store.queries.order_view("o1")
    assert view is not None
    assert [(p["state"], p["attempts"], p["last_error"]) for p in view["pushes"]] == [
        ("failed", 2, "400 bad courier_info"),
        ("pending", 0, None),
    ]
    out.hold_for_cancel("o1", T0, 60)
    assert out.finish_cancel("o1", T0) == 2
    assert out.stats() == (0, None, 0)
    out.record_results([PushResult(head.id, DELIVERED, T0)])  # a late reply changes nothing
    assert store.queries.order_view("o1")["pushes"][0]["state"] == "cancelled"  # type: ignore[index]


def test_a_burst_of_results_records_each_push_as_one_result_would(store: Store) -> None:
    """Deliveries are recorded together (one statement per time on SQLite), retries and
    failures each: every push gets its own result, deliveries at their own time, and a
    push cancelled meanwhile stays cancelled."""
    orders = [f"o{i}" for i in range(6)]
    store.writer.commit(
        [status(f"e{i}", o, Status.DASHER_CONFIRMED) for i, o in enumerate(orders)], now=T0
    )
    out = store.outbox
    rows = {r.order_id: r for r in out.claim_due(T0, 10)}
    assert sorted(rows) == orders
    out.hold_for_cancel("o5", T0, 60)
    assert out.finish_cancel("o5", T0) == 1
    out.record_results(
        [
            PushResult(rows["o0"].id, DELIVERED, T0 + 1),
            PushResult(rows["o1"].id, PENDING, T0 + 1, T0 + 6, "503 busy"),
            PushResult(rows["o2"].id, DELIVERED, T0 + 1),
            PushResult(rows["o3"].id, FAILED, T0 + 1, None, "400 bad"),
            PushResult(rows["o4"].id, DELIVERED, T0 + 2),
            PushResult(rows["o5"].id, DELIVERED, T0 + 1),  # a late reply changes nothing
        ]
    )
    got = {
        o: store.db.row(
            "SELECT state, attempts, last_error, next_attempt_at, delivered_at "
            "FROM outbox WHERE id = ?",
            (rows[o].id,),
        )
        for o in orders
    }
    assert got == {
        "o0": ("delivered", 1, None, T0, T0 + 1),
        "o1": ("pending", 1, "503 busy", T0 + 6, None),
        "o2": ("delivered", 1, None, T0, T0 + 1),
        "o3": ("failed", 1, "400 bad", T0, None),
        "o4": ("delivered", 1, None, T0, T0 + 2),
        "o5": ("cancelled", 0, "order cancelled", T0, None),
    }


def test_cancel_hold_keeps_pushes_and_refuses_a_dropped_off_order(store: Store) -> None:
    """While a cancel is asked, the order's pushes (old and new) are held; a dropoff that
    lands meanwhile is recorded but not pushed; released, the pushes flow again."""
    out = store.outbox
    store.writer.commit([status("a", "o1", Status.ARRIVING_AT_STORE)], now=T0)
    out.hold_for_cancel("o1", T0, 60)
    assert out.claim_due(T0 + 1, 10) == []
    with pytest.raises(InputError, match="being cancelled"):
        out.hold_for_cancel("o1", T0 + 1, 60)
    store.writer.commit([status("b", "o1", Status.DROPOFF)], now=T0 + 1)
    assert out.claim_due(T0 + 1, 10) == []  # the dropoff's push waits too
    assert store.queries.order_view("o1")["cancelling"] is True  # type: ignore[index]
    out.release_hold("o1")
    assert _ids(out.claim_due(T0 + 2, 10)) == [("o1", "dasher_confirmed")]
    with pytest.raises(InputError, match="dropped off"):
        out.hold_for_cancel("o1", T0 + 2, 60)


def test_a_cancel_hold_that_expires_lets_pushes_go(store: Store) -> None:
    """A cancel command that died leaves a hold; once it expires the pushes flow."""
    out = store.outbox
    store.writer.commit([status("a", "o1", Status.DASHER_CONFIRMED)], now=T0)
    out.hold_for_cancel("o1", T0, 60)
    assert out.release_expired_holds(T0 + 59) == 0
    assert out.release_expired_holds(T0 + 61) == 1
    assert _ids(out.claim_due(T0 + 61, 10)) == [("o1", "dasher_confirmed")]


def test_auto_dropoff_of_a_couriers_only_order(store_settings: StoreSettings) -> None:
    """With `geofence.auto_dropoff` on, a courier with one order waits at the customer's
    door: the fixes infer the dropoff. (The planner walked the courier's set of active
    orders while the dropoff took the order out of it: every such fix failed its batch
    and was dead-lettered, and the order was never dropped off.)"""
    store = open_store(store_settings, geofence=GeofenceSettings(auto_dropoff=True))
    try:
        pickup, door = Place(40.0, -74.0, 50.0), Place(40.05, -74.0, 50.0)
        store.writer.commit([Assignment("o1", "c1", pickup=pickup, dropoff=door)], now=T0)
        out = StatusEvent("e1", "o1", "c1", Status.DASHER_OUT_FOR_DELIVERY, iso(T0 + 1))
        store.writer.commit([out], now=T0 + 1)
        for t in (T0 + 100 + 40 * i for i in range(4)):
            store.writer.commit([LocationFix("c1", iso(t), door.lat, door.lng, 5.0)], now=t)
        order = store.outbox.get_order("o1")
        assert order is not None and order.state == Status.DROPOFF.value
    finally:
        store.close()


def test_a_status_after_a_hold_expired_but_before_its_release_waits_its_turn(
    store: Store,
) -> None:
    """A hold ends when housekeeping releases it (every few seconds), not at the very
    moment it expires: a status that lands in between joins the held pushes, so it is
    never pushed ahead of the order's earlier held statuses (CONTRACT 4: in order)."""
    out = store.outbox
    store.writer.commit([status("a", "o1", Status.DASHER_CONFIRMED)], now=T0)
    out.hold_for_cancel("o1", T0, 60)
    store.writer.commit([status("b", "o1", Status.ARRIVING_AT_STORE)], now=T0 + 61)
    assert out.claim_due(T0 + 61, 10) == []  # the earlier status is still held
    assert out.release_expired_holds(T0 + 62) == 2
    assert _ids(out.claim_due(T0 + 62, 10)) == [("o1", "dasher_confirmed")]


def test_clock_step_keeps_what_was_due_and_what_was_waiting(store: Store) -> None:
    """After the clock is set back an hour, a push that was due is still due, and a retry
    that was 30 s away is still 30 s away."""
    out = store.outbox
    store.writer.commit(
        [status("a", "o1", Status.DASHER_CONFIRMED), status("b", "o2", Status.DASHER_CONFIRMED)],
        now=T0,
    )
    first = out.claim_due(T0, 1)[0]
    out.record_results([PushResult(first.id, PENDING, T0, T0 + 30, "503")])
    assert out.shift_schedule(-3600) == 2
    due = out.claim_due(T0 - 3600, 10)
    assert _ids(due) == [("o2", "dasher_confirmed")]
    out.unclaim([r.id for r in due])
    assert {r.order_id for r in out.claim_due(T0 - 3600 + 30, 10)} == {"o1", "o2"}


def test_claim_and_stats_use_partial_indexes(sqlite_store: Store) -> None:
    """Claiming never scans the outbox table, however many delivered rows it holds."""
    store = sqlite_store

    def plan(sql: str, params: tuple[object, ...] = ()) -> list[str]:
        return [r[3] for r in store.db.rows("EXPLAIN QUERY PLAN " + sql, params)]

    claim = plan(CLAIM_SQL, (0, 1))
    assert any("USING INDEX outbox_due" in step for step in claim), claim
    assert any("USING INDEX outbox_open" in step for step in claim), claim
    assert not any(step.startswith("SCAN outbox") and "INDEX" not in step for step in claim)
    for sql, index in (
        ("SELECT count(*), min(created_at) FROM outbox WHERE state = 'pending'", "outbox_due"),
        ("SELECT count(*) FROM outbox WHERE state = 'failed'", "outbox_failed"),
    ):
        steps = plan(sql)
        assert any(f"INDEX {index}" in s for s in steps), steps


def test_a_writer_waits_for_the_write_lock_then_gives_up_at_its_busy_timeout(
    tmp_path: Path,
) -> None:
    """Another writer (an operator's shell) holds the lock: a transaction waits and goes
    on once it is released, after that writer's rows; held past busy_timeout, the
    transaction fails as StoreUnavailable (the database, not the data)."""
    db = SqliteDatabase(tmp_path / "c.db", busy_timeout_s=5)
    db.execute("CREATE TABLE t (x INTEGER)")
    shell = sqlite3.connect(tmp_path / "c.db", isolation_level=None, check_same_thread=False)
    shell.execute("BEGIN IMMEDIATE")
    shell.execute("INSERT INTO t VALUES (1)")
    threading.Timer(0.3, lambda: shell.execute("COMMIT")).start()  # the shell's own pace
    with db.transaction():
        seen = db.value("SELECT count(*) FROM t")  # inside: the shell had committed
        db.execute("INSERT INTO t VALUES (2)")
    assert seen == 1
    assert db.rows("SELECT x FROM t ORDER BY rowid") == [(1,), (2,)]

    impatient = SqliteDatabase(tmp_path / "c.db", busy_timeout_s=0.2)
    shell.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreUnavailable, match="cannot write"), impatient.transaction():
        impatient.execute("INSERT INTO t VALUES (3)")
    shell.execute("ROLLBACK")
    assert db.rows("SELECT x FROM t ORDER BY rowid") == [(1,), (2,)]
    for conn in (db, impatient):
        conn.close()
    shell.close()


def test_a_batch_moves_the_change_marker_once_however_many_orders_it_writes(
    sqlite_store: Store,
) -> None:
    """The writer's updates of order rows move the change marker once per batch (it
    moves it itself), not once per row through the update trigger; a new row moves it
    through the insert trigger, and anyone else's insert or update, row by row."""
    store = sqlite_store
    seq = "SELECT seq FROM changes WHERE name = 'orders'"
    before = store.db.value(seq)
    new = [status(f"e{i}", f"o{i}", Status.DASHER_CONFIRMED) for i in range(5)]
    store.writer.commit(new, now=T0)  # five new rows: the insert trigger, and the batch
    assert store.db.value(seq) == before + 6
    known = [status(f"f{i}", f"o{i}", Status.ARRIVING_AT_STORE) for i in range(5)]
    store.writer.commit(known, now=T0 + 1)  # the same five, updated: once
    assert store.db.value(seq) == before + 7
    store.writer.commit([status("e0", "o0", Status.DASHER_CONFIRMED)], now=T0 + 2)
    assert store.db.value(seq) == before + 7  # a duplicate writes no order row
    with store.db.transaction():  # anyone else: the triggers, row by row
        store.db.execute("UPDATE orders SET updated_at = 'x' WHERE order_id IN ('o1', 'o2')")
        store.db.execute(
            "INSERT INTO orders (order_id, state, updated_at) VALUES ('p1', 'new', 'x')"
        )
    assert store.db.value(seq) == before + 10


@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 64, 95, 100])
def test_insert_rows_writes_every_row_in_order(store: Store, n: int) -> None:
    """`insert_rows` (several rows per statement on SQLite) writes each row once, in
    the order given, whatever the count; an ON CONFLICT tail applies to each row."""
    db = store.db
    rows = [(f"o{i % 7}", f"e{n - i}", f"t{i}") for i in range(n)]
    with db.transaction():
        db.insert_rows(
            "INSERT INTO processed_events (order_id, event_id, seen_at) VALUES",
            "(?, ?, ?)",
            [*rows, *rows[:3]],  # seen again: nothing more
            " ON CONFLICT (order_id, event_id) DO NOTHING",
        )
        db.insert_rows(
            "INSERT INTO transitions (order_id, status, inferred, event_id, at, recorded_at) "
            "VALUES",
            "(?, 'x', 0, ?, ?, 'r')",
            rows,
        )
    assert sorted(db.rows("SELECT order_id, event_id, seen_at FROM processed_events")) == sorted(
        rows
    )
    assert db.rows("SELECT order_id, event_id, at FROM transitions ORDER BY id") == rows


def test_insert_rows_keeps_few_statement_texts(sqlite_store: Store) -> None:
    """SQLite: a handful of statement texts per table (32 rows, then halves), so that
    each stays prepared in the connection's statement cache."""
    seen: set[str] = set()
    db = sqlite_store.db
    db.conn.set_trace_callback(seen.add)  # type: ignore[attr-defined]
    with db.transaction():
        for n in range(1, 80):
            db.insert_rows(
                "INSERT INTO processed_events (order_id, event_id, seen_at) VALUES",
                "(?, ?, ?)",
                [(f"o{n}", f"e{i}", "t") for i in range(n)],
            )
    texts = {s.split(" VALUES ")[1].count("(") for s in seen if "processed_events" in s}
    assert texts == {32, 16, 8, 4, 2, 1}
    traced: list[str] = []
    db.conn.set_trace_callback(traced.append)  # type: ignore[attr-defined]
    with db.transaction():  # 79 rows: 32 + 32 + 8 + 4 + 2 + 1, six statements
        db.insert_rows(
            "INSERT INTO processed_events (order_id, event_id, seen_at) VALUES",
            "(?, ?, ?)",
            [("p79", f"e{i}", "t") for i in range(79)],
        )
    sizes = [s.split(" VALUES ")[1].count("(") for s in traced if "processed_events" in s]
    assert sizes == [32, 32, 8, 4, 2, 1]


def test_none_is_bound_through_an_adapter() -> None:
    """The store registers an adapter for None: without one, the sqlite3 module raises and
    formats two AttributeErrors (its protocol's `__adapt__`, the value's `__conform__`)
    for each None it binds before it binds NULL."""
    import courierd.store.sqlite  # noqa: F401  (what registers it)

    assert (type(None), sqlite3.PrepareProtocol) in sqlite3.adapters
    conn = sqlite3.connect(":memory:")
    assert conn.execute("SELECT typeof(?)", (None,)).fetchone() == ("null",)
    conn.close()

"""The SQLite store on a real file: batches are atomic, migrations, outbox claims."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from courierd.domain.lifecycle import cancel
from courierd.domain.model import (
    DeadLetter,
    LocationFix,
    ProfileUpdate,
    Status,
    StatusEvent,
    Transition,
)
from courierd.domain.planner import Effects
from courierd.errors import StoreError
from courierd.store.sqlite import (
    CLAIM_SQL,
    DELIVERED,
    FAILED,
    MIGRATIONS,
    PENDING,
    PushResult,
    Store,
)

T0 = 1_700_000_000.0


def status(eid: str, order: str, st: Status, courier: str = "c1") -> StatusEvent:
    return StatusEvent(eid, order, courier, st)


def test_commit_batch_persists_everything_in_the_file(store: Store, db_path: Path) -> None:
    """Orders, transitions, pushes, dead letters, events, profile and latest fix survive reopen."""
    store.commit_batch(
        [
            ProfileUpdate("c1", {"full_name": "Mike"}),
            status("e1", "o1", Status.ARRIVING_AT_STORE),
            DeadLetter("couriers/c1/status", b"{", "bad_json", "payload is not JSON"),
            LocationFix("c1", "2024-01-01T00:00:02.000Z", 1.0, 2.0),
            LocationFix("c1", "2024-01-01T00:00:01.000Z", 9.0, 9.0),  # older: ignored
        ],
        now=T0,
    )
    store.close()
    again = Store(db_path)
    view = again.order_view("o1")
    assert view is not None
    assert view["state"] == "arriving_at_store" and view["courier_id"] == "c1"
    assert [(t["status"], t["inferred"]) for t in view["transitions"]] == [
        ("dasher_confirmed", True),
        ("arriving_at_store", False),
    ]
    assert [p["status"] for p in view["pushes"]] == ["dasher_confirmed", "arriving_at_store"]
    assert all(not p["delivered"] and p["attempts"] == 0 for p in view["pushes"])
    body = again.conn.execute("SELECT body FROM outbox ORDER BY id").fetchone()[0]
    assert body == '{"delivery_status":"dasher_confirmed","courier_info":{"full_name":"Mike"}}'
    assert again.conn.execute("SELECT reason, payload FROM dead_letters").fetchall() == [
        ("bad_json", b"{")
    ]
    assert again.conn.execute("SELECT lat, lng FROM couriers").fetchall() == [(1.0, 2.0)]
    assert again.conn.execute("SELECT event_id FROM processed_events").fetchall() == [("e1",)]
    again.close()


def test_batch_fails_midway_nothing_lands(store: Store) -> None:
    """A failure after some rows were written rolls the whole batch back."""
    fx = store.commit_batch([status("e1", "o1", Status.DASHER_CONFIRMED)], now=T0)
    assert fx.pushes
    poisoned = Effects()
    poisoned.orders["o2"] = cancel(None, "o2")
    poisoned.event_ids.append("e2")
    poisoned.transitions.append(Transition("o2", Status.DROPOFF, False, "e2", None))  # type: ignore[arg-type]
    with pytest.raises(sqlite3.IntegrityError), store.transaction():
        store.write(poisoned, now=T0, now_iso="2026-01-01T00:00:00.000Z")
    assert store.get_order("o2") is None
    assert store.conn.execute("SELECT count(*) FROM processed_events").fetchone()[0] == 1
    # and the store is still usable afterwards
    store.commit_batch([status("e3", "o1", Status.ARRIVING_AT_STORE)], now=T0)
    assert store.get_order("o1").state == "arriving_at_store"  # type: ignore[union-attr]


def test_migrations_on_empty_and_existing_database(tmp_path: Path) -> None:
    """An empty file is brought to the latest version; reopening keeps data and version."""
    path = tmp_path / "db.sqlite"
    sqlite3.connect(path).close()  # an existing, empty database file
    s = Store(path)
    assert s.schema_version == len(MIGRATIONS)
    s.commit_batch([status("e1", "o1", Status.DASHER_CONFIRMED)], now=T0)
    s.close()
    s = Store(path)
    assert s.schema_version == len(MIGRATIONS)
    assert s.get_order("o1") is not None
    mode = s.conn.execute("PRAGMA journal_mode").fetchone()[0]
    sync = s.conn.execute("PRAGMA synchronous").fetchone()[0]
    assert (mode, sync) == ("wal", 2)  # 2 = FULL
    s.close()


def test_newer_schema_refused(tmp_path: Path) -> None:
    """A database from a newer courierd is refused with an upgrade hint, not damaged."""
    path = tmp_path / "db.sqlite"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this courierd"):
        Store(path)


def test_corrupt_state_value_is_a_store_error(store: Store) -> None:
    """A state the machine does not know, found on load, is fatal rather than guessed at."""
    store.conn.execute(
        "INSERT INTO orders (order_id, state, updated_at) VALUES ('o9', 'teleported', 'x')"
    )
    with pytest.raises(StoreError, match="teleported"):
        store.commit_batch([status("e1", "o9", Status.DROPOFF)], now=T0)


def test_unwritable_path_is_a_store_error(tmp_path: Path) -> None:
    """A database path that cannot be created is a clear StoreError."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot open database"):
        Store(blocker / "sub" / "db.sqlite")


def _ids(rows: list) -> list[tuple[str, str]]:  # type: ignore[type-arg]
    return [(r.order_id, r.status) for r in rows]


def test_claims_head_of_each_order_only(store: Store) -> None:
    """Only the first pending push of each order is claimable; in-flight ones are skipped."""
    store.commit_batch(
        [status("a", "o1", Status.ARRIVED_AT_STORE), status("b", "o2", Status.DASHER_CONFIRMED)],
        now=T0,
    )
    rows = store.claim_due(T0, limit=10)
    assert _ids(rows) == [("o1", "dasher_confirmed"), ("o2", "dasher_confirmed")]
    assert store.claim_due(T0 - 1, limit=10) == []  # nothing due before it was created
    assert _ids(store.claim_due(T0, limit=10, busy=[rows[0].id])) == [("o2", "dasher_confirmed")]

    store.record_results([PushResult(rows[0].id, DELIVERED, T0)])
    assert _ids(store.claim_due(T0, 10)) == [
        ("o1", "arriving_at_store"),
        ("o2", "dasher_confirmed"),
    ]


def test_retry_failure_and_cancel_states(store: Store) -> None:
    """A retry waits until its time; a parked failure blocks the order; cancel drops pushes."""
    store.commit_batch([status("a", "o1", Status.ARRIVING_AT_STORE)], now=T0)
    head = store.claim_due(T0, 10)[0]
    store.record_results([PushResult(head.id, PENDING, T0, T0 + 5, "503 busy")])
    assert store.claim_due(T0 + 4, 10) == []
    assert _ids(store.claim_due(T0 + 5, 10)) == [("o1", "dasher_confirmed")]
    store.record_results([PushResult(head.id, FAILED, T0 + 5, None, "400 bad courier_info")])
    assert store.claim_due(T0 + 100, 10) == []  # the second push waits behind the failure
    assert store.outbox_stats() == (1, T0, 1)
    view = store.order_view("o1")
    assert view is not None
    assert [(p["state"], p["attempts"], p["last_error"]) for p in view["pushes"]] == [
        ("failed", 2, "400 bad courier_info"),
        ("pending", 0, None),
    ]
    assert store.save_cancel(cancel(store.get_order("o1"), "o1"), "now") == 2
    assert store.outbox_stats() == (0, None, 0)
    store.record_results([PushResult(head.id, DELIVERED, T0)])  # a late reply changes nothing
    assert store.order_view("o1")["pushes"][0]["state"] == "cancelled"  # type: ignore[index]


def test_claim_and_stats_use_partial_indexes(store: Store) -> None:
    """Claiming never scans the outbox table, however many delivered rows it holds."""
    plan = " ".join(r[3] for r in store.conn.execute("EXPLAIN QUERY PLAN " + CLAIM_SQL, (0, 1)))
    assert "USING INDEX outbox_due" in plan and "USING INDEX outbox_open" in plan
    for sql in (
        "SELECT count(*), min(created_at) FROM outbox WHERE state = 'pending'",
        "SELECT count(*) FROM outbox WHERE state = 'failed'",
    ):
        plan = " ".join(r[3] for r in store.conn.execute("EXPLAIN QUERY PLAN " + sql))
        assert "INDEX" in plan, plan

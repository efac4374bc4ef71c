"""Schema migrations: append only. A released migration never changes.

SQLite counts applied migrations in `PRAGMA user_version`; each migration runs in
its own transaction together with the version bump, so a failure leaves the database
exactly as it was. sqlite-utils builds the first schema (from 4.0 on it no longer
commits inside `Table.create`, which is what makes that transaction hold: see the
floor in pyproject.toml and tests/test_store.py); later ones are plain DDL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlite_utils

PENDING, DELIVERED, FAILED, DROPPED, HELD = "pending", "delivered", "failed", "cancelled", "held"


def _sqlite_1(db: sqlite_utils.Database) -> None:
    """The first schema: orders, transitions, outbox, dead letters, events, couriers."""
    db.table("orders").create(
        {"order_id": str, "state": str, "courier_id": str, "updated_at": str},
        pk="order_id",
        not_null={"state", "updated_at"},
    )
    db.table("transitions").create(
        {
            "id": int,
            "order_id": str,
            "status": str,
            "inferred": int,
            "event_id": str,
            "at": str,
            "recorded_at": str,
        },
        pk="id",
        not_null={"order_id", "status", "inferred", "at", "recorded_at"},
    )
    db.table("transitions").create_index(["order_id", "id"])
    db.table("outbox").create(
        {
            "id": int,
            "order_id": str,
            "status": str,
            "body": str,
            "idempotency_key": str,
            "state": str,
            "attempts": int,
            "next_attempt_at": float,
            "last_error": str,
            "created_at": float,
            "delivered_at": float,
        },
        pk="id",
        not_null={
            "order_id",
            "status",
            "body",
            "idempotency_key",
            "state",
            "attempts",
            "next_attempt_at",
            "created_at",
        },
        defaults={"state": PENDING, "attempts": 0},
    )
    db.table("outbox").create_index(["idempotency_key"], unique=True)
    db.table("outbox").create_index(["order_id", "id"])
    # Partial indexes: claiming and counting never touch delivered rows, however many.
    db.execute("CREATE INDEX outbox_due ON outbox(next_attempt_at) WHERE state = 'pending'")
    db.execute(
        "CREATE INDEX outbox_open ON outbox(order_id, id) WHERE state IN ('pending', 'failed')"
    )
    db.execute("CREATE INDEX outbox_failed ON outbox(order_id, id) WHERE state = 'failed'")
    db.table("dead_letters").create(
        {
            "id": int,
            "topic": str,
            "payload": bytes,
            "reason": str,
            "detail": str,
            "received_at": str,
        },
        pk="id",
        not_null={"topic", "payload", "reason", "received_at"},
    )
    db.execute("CREATE TABLE processed_events (event_id TEXT PRIMARY KEY) WITHOUT ROWID")
    db.table("couriers").create(
        {
            "courier_id": str,
            "profile": str,
            "profile_at": str,
            "fix_ts": str,
            "lat": float,
            "lng": float,
            "accuracy_m": float,
            "speed_mps": float,
            "heading": float,
        },
        pk="courier_id",
    )


_SQLITE_2 = (
    # A cancel in progress holds the order's pushes until it is done (or this passes).
    "ALTER TABLE orders ADD COLUMN hold_until REAL",
    "CREATE INDEX outbox_held ON outbox(order_id) WHERE state = 'held'",
    "CREATE INDEX orders_held ON orders(hold_until) WHERE hold_until IS NOT NULL",
    # Retention: what finished orders leave behind, and dead letters, by age.
    "CREATE INDEX orders_finished ON orders(updated_at) WHERE state IN ('dropoff', 'cancelled')",
    "ALTER TABLE processed_events ADD COLUMN order_id TEXT",
    "ALTER TABLE processed_events ADD COLUMN seen_at TEXT",
    "CREATE INDEX processed_events_order ON processed_events(order_id)",
    "ALTER TABLE dead_letters ADD COLUMN size INTEGER",
    "CREATE INDEX dead_letters_received ON dead_letters(received_at)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    # Event ids from before this migration name no order: they age from now.
    "INSERT INTO meta VALUES ('legacy_events_since', strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
)


def _sqlite_2(db: sqlite_utils.Database) -> None:
    """Cancel holds, retention indexes, dead-letter sizes, a meta table."""
    for statement in _SQLITE_2:
        db.execute(statement)


_SQLITE_3 = (
    # When the order reached its state (the geofence's departure rule needs it).
    "ALTER TABLE orders ADD COLUMN status_at TEXT",
    # Places: from dispatch's assignment, else the store registry / the order's address.
    "ALTER TABLE orders ADD COLUMN pickup_lat REAL",
    "ALTER TABLE orders ADD COLUMN pickup_lng REAL",
    "ALTER TABLE orders ADD COLUMN pickup_radius_m REAL",
    "ALTER TABLE orders ADD COLUMN dropoff_lat REAL",
    "ALTER TABLE orders ADD COLUMN dropoff_lng REAL",
    "ALTER TABLE orders ADD COLUMN dropoff_radius_m REAL",
    "ALTER TABLE orders ADD COLUMN store_id TEXT",  # the order's store.merchant_supplied_id
    "ALTER TABLE orders ADD COLUMN address_lat REAL",  # the order's delivery_address
    "ALTER TABLE orders ADD COLUMN address_lng REAL",
    "ALTER TABLE orders ADD COLUMN track TEXT",  # the geofence rules' state, JSON
    # A courier's active orders, found without a scan on every fix.
    "CREATE INDEX orders_active ON orders(courier_id) "
    "WHERE courier_id IS NOT NULL AND state NOT IN ('dropoff', 'cancelled')",
    # Where a status came from (app, geofence, fill) and, for a geofence one, where.
    "ALTER TABLE transitions ADD COLUMN source TEXT",
    "UPDATE transitions SET source = CASE WHEN inferred = 1 THEN 'fill' ELSE 'app' END",
    "ALTER TABLE transitions ADD COLUMN lat REAL",
    "ALTER TABLE transitions ADD COLUMN lng REAL",
    "ALTER TABLE outbox ADD COLUMN source TEXT",
    # The offline watchdog: when a courier was last heard from, and whether it was
    # reported offline (one alert per silence).
    "ALTER TABLE couriers ADD COLUMN last_seen REAL",
    "ALTER TABLE couriers ADD COLUMN offline INTEGER NOT NULL DEFAULT 0",
    "CREATE INDEX couriers_online ON couriers(last_seen) WHERE offline = 0",
    "CREATE TABLE stores (merchant_supplied_id TEXT PRIMARY KEY, lat REAL NOT NULL, "
    "lng REAL NOT NULL, radius_m REAL, updated_at TEXT NOT NULL) WITHOUT ROWID",
    # Recent accepted fixes of couriers with geofenced orders, for the operator page.
    "CREATE TABLE track_points (id INTEGER PRIMARY KEY, courier_id TEXT NOT NULL, "
    "ts TEXT NOT NULL, lat REAL NOT NULL, lng REAL NOT NULL, accuracy_m REAL, "
    "recorded_at TEXT NOT NULL)",
    "CREATE INDEX track_points_courier ON track_points(courier_id, ts)",
    "CREATE INDEX track_points_recorded ON track_points(recorded_at)",
    # MQTT messages for courierd to publish (alerts, order events): an outbox too.
    "CREATE TABLE notifications (id INTEGER PRIMARY KEY, topic TEXT NOT NULL, "
    "payload TEXT NOT NULL, created_at REAL NOT NULL)",
)


def _sqlite_3(db: sqlite_utils.Database) -> None:
    """Places, geofence state, sources, the offline watchdog, stores, track, notifications."""
    for statement in _SQLITE_3:
        db.execute(statement)


_SQLITE_4 = (
    # Claims with a lease, for databases several instances share (PostgreSQL): a dead
    # instance's claims expire and another takes them; its late results are fenced off.
    "ALTER TABLE outbox ADD COLUMN claimed_by TEXT",
    "ALTER TABLE outbox ADD COLUMN lease_until REAL",
    # Jobs one instance at a time does (notifier, housekeeping), by lease.
    "CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT, until REAL) WITHOUT ROWID",
)


def _sqlite_4(db: sqlite_utils.Database) -> None:
    """Leases on claims and on singleton jobs (the same schema as PostgreSQL's)."""
    for statement in _SQLITE_4:
        db.execute(statement)


# OneTablet's events about orders (CONTRACT.md 11), shared by both engines.
_EVENTS = (
    "ALTER TABLE orders ADD COLUMN confirmed_at TEXT",
    "ALTER TABLE orders ADD COLUMN ready_at TEXT",
    "CREATE TABLE onetablet_events (event_id TEXT PRIMARY KEY, order_id TEXT NOT NULL, "
    "type TEXT NOT NULL, received_at TEXT NOT NULL)",
    "CREATE INDEX onetablet_events_order ON onetablet_events(order_id)",
)


def _sqlite_5(db: sqlite_utils.Database) -> None:
    """The restaurant's confirmation and readiness, and OneTablet's event ids."""
    for statement in _EVENTS:
        db.execute(statement)


# Data integrity (CONTRACT.md 12), shared by both engines.
_INTEGRITY = (
    # The ts of the assignment that bound the order: an older one never replaces it.
    "ALTER TABLE orders ADD COLUMN assigned_at TEXT",
    # When the order reached its state on the event's own clock (app ts or fix ts; NULL
    # without one): the geofence timers use it, never the receive time in status_at.
    "ALTER TABLE orders ADD COLUMN status_ts TEXT",
    "UPDATE orders SET status_ts = status_at",  # as the timers read it before
    # Expired (abandoned) orders are finished too: the partial indexes say so, spelled
    # as the queries spelled them then, so that SQLite uses them (migration 9 respells them).
    "DROP INDEX orders_active",
    "CREATE INDEX orders_active ON orders(courier_id) "
    "WHERE courier_id IS NOT NULL AND state NOT IN ('cancelled', 'dropoff', 'expired')",
    "DROP INDEX orders_finished",
    "CREATE INDEX orders_finished ON orders(updated_at) "
    "WHERE state IN ('cancelled', 'dropoff', 'expired')",
    "CREATE INDEX orders_idle ON orders(updated_at) "
    "WHERE state NOT IN ('cancelled', 'dropoff', 'expired')",
    # When a courier's last accepted fix arrived (courierd's clock): an order whose
    # courier still sends fixes is not abandoned.
    "ALTER TABLE couriers ADD COLUMN fix_at REAL",
)
# Event ids are an app's to choose: deduplicated per order, so one app's ids never
# suppress another order's statuses. Ids from before they named their order get ''.
_SQLITE_EVENTS_PER_ORDER = (
    "CREATE TABLE processed_events_by_order (order_id TEXT NOT NULL, event_id TEXT NOT NULL, "
    "seen_at TEXT, PRIMARY KEY (order_id, event_id)) WITHOUT ROWID",
    "INSERT INTO processed_events_by_order SELECT coalesce(order_id, ''), event_id, seen_at "
    "FROM processed_events",
    "DROP TABLE processed_events",
    "ALTER TABLE processed_events_by_order RENAME TO processed_events",
)
_PG_EVENTS_PER_ORDER = (
    "UPDATE processed_events SET order_id = '' WHERE order_id IS NULL",
    "ALTER TABLE processed_events DROP CONSTRAINT processed_events_pkey",
    "ALTER TABLE processed_events ALTER COLUMN order_id SET NOT NULL",
    "ALTER TABLE processed_events ADD PRIMARY KEY (order_id, event_id)",
    "DROP INDEX processed_events_order",  # the primary key starts with the order id
)
# Replay (CONTRACT.md 13), shared by both engines. A courier's accepted fixes are
# consumed in `ts` order (each is newer than the last), so the fixes an order's rules
# consumed are, for each courier it had in turn, that courier's `track_points` rows from
# the first one consumed on, as many as were consumed: `orders.consumed` holds those
# segments, JSON [[courier_id, first_ts, count], ...], rewritten with the order's rule
# state on every fix (no row more per fix). Each transition records how many fixes the
# order had consumed when it was decided, so replay puts the app's statuses back
# between the right fixes.
_REPLAY = (
    "ALTER TABLE orders ADD COLUMN consumed TEXT",
    "ALTER TABLE transitions ADD COLUMN fixes INTEGER",
    # 0 when the event had no ts and the receive time stands in `at` (replay decides the
    # timers as live: fix time only, CONTRACT.md 12); NULL in rows from before.
    "ALTER TABLE transitions ADD COLUMN clocked INTEGER",
)


def _sqlite_6(db: sqlite_utils.Database) -> None:
    """Data integrity: assignment times, event ids per order."""
    for statement in (*_INTEGRITY, *_SQLITE_EVENTS_PER_ORDER):
        db.execute(statement)


def _sqlite_7(db: sqlite_utils.Database) -> None:
    """Which accepted fixes each order consumed, for `courierd replay`."""
    for statement in _REPLAY:
        db.execute(statement)


# A change marker for the ingest writer (SQLite): `changes.seq` of 'orders' moves with
# every row written to `orders` or `stores` (inserted, updated, deleted), by triggers,
# so whoever writes (the API, expiry, holds, inbound events, retention, an operator's
# own SQL) moves it without knowing of it. The writer reads it as its batch begins and
# once more after its own writes: unmoved in between, the order rows it keeps are still
# what a read would give, and it need not read them again (store/writer.py). One update
# is left out: the writer's own rewrite of a track, which also moves the row's
# `track_rev` (nobody else writes that column; moving the marker on each of those cost
# 2.5 % of the ingest process's instructions per geofenced fix; since then its update
# of an order's state moves `track_rev` too, and it moves the marker once per batch
# itself: store/writer.py). SQLite only: one
# daemon writes a file, and an older courierd refuses a newer schema, so no writer that
# predates the marker can run beside it. (PostgreSQL instances share the database and
# read every row, marker or none: see the writer.)
_MOVE_MARKER = "BEGIN UPDATE changes SET seq = seq + 1 WHERE name = 'orders'; END"
_SQLITE_8 = (
    "CREATE TABLE changes (name TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID",
    "INSERT INTO changes VALUES ('orders', 0)",
    "ALTER TABLE orders ADD COLUMN track_rev INTEGER NOT NULL DEFAULT 0",
    *(
        f"CREATE TRIGGER {table}_{event.lower()}_marker AFTER {event} ON {table} {_MOVE_MARKER}"
        for table in ("orders", "stores")
        for event in ("INSERT", "DELETE")
    ),
    "CREATE TRIGGER orders_update_marker AFTER UPDATE ON orders "
    f"WHEN NEW.track_rev IS OLD.track_rev {_MOVE_MARKER}",
    f"CREATE TRIGGER stores_update_marker AFTER UPDATE ON stores {_MOVE_MARKER}",
)


def _sqlite_8(db: sqlite_utils.Database) -> None:
    """The writer's change marker on orders and stores."""
    for statement in _SQLITE_8:
        db.execute(statement)


# The partial indexes on orders, spelled as comparisons (lifecycle.active_sql and
# finished_sql, which the queries use): SQLite evaluates `state NOT IN (three values)`
# with a temporary table, for each index, each row an UPDATE writes, and every
# transition writes `state` (three indexes: about 15 of the order row's 18 µs on this
# project's machine). Same rows, same columns; only the spelling. PostgreSQL keeps its
# `NOT IN` indexes: it proves either spelling from the other, and pays nothing per row.
_SQLITE_9 = (
    "DROP INDEX orders_active",
    "CREATE INDEX orders_active ON orders(courier_id) WHERE courier_id IS NOT NULL AND "
    "(state <> 'cancelled' AND state <> 'dropoff' AND state <> 'expired')",
    "DROP INDEX orders_finished",
    "CREATE INDEX orders_finished ON orders(updated_at) "
    "WHERE (state = 'cancelled' OR state = 'dropoff' OR state = 'expired')",
    "DROP INDEX orders_idle",
    "CREATE INDEX orders_idle ON orders(updated_at) "
    "WHERE (state <> 'cancelled' AND state <> 'dropoff' AND state <> 'expired')",
)


def _sqlite_9(db: sqlite_utils.Database) -> None:
    """The orders' partial indexes without IN lists."""
    for statement in _SQLITE_9:
        db.execute(statement)


def _sqlite_10(db: sqlite_utils.Database) -> None:
    """Reserved: three builds of main between releases each had a migration 10: a
    change-marker trigger (920d56c) and dropping `track_points_recorded` (ccb0a96), both
    reverted, and migration 11's swap (573bea5). A database one of them opened is at
    10: migration 11 undoes the first two and makes the third whatever it finds."""


# Undoing a reverted migration 10 (above), on a database at 10: the insert trigger as
# migration 8 made it, and the index on fixes' `recorded_at` (no-ops on any other).
_SQLITE_11_REPAIR = (
    "DROP TRIGGER IF EXISTS orders_insert_marker",
    f"CREATE TRIGGER orders_insert_marker AFTER INSERT ON orders {_MOVE_MARKER}",
    "CREATE INDEX IF NOT EXISTS track_points_recorded ON track_points(recorded_at)",
)
# A push per status and order (lifecycle.idempotency_key is uuid5 of the two), told
# apart by the two, not by the key's text: a unique index on 36 random characters put
# each push at a random place in its B-tree, and it and (order_id, id) were about 8 of
# the 37 µs a status costs the ingest process (bench/profile_ingest.py, statuses only).
# One index on (order_id, status) keeps the same rows unique (the key is a function of
# them, so no stored rows can collide) and serves every read by order (at most one row
# per status: their order by id is a sort of a handful). SQLite only, for now: on a
# shared PostgreSQL database an instance not yet upgraded still inserts with
# `ON CONFLICT (idempotency_key)`, which needs that index (a rolling upgrade would stop
# it); there, the change waits for a migration that can add the new index first and
# drop the old ones a release later (Database.push_key).
_SQLITE_11 = (
    *_SQLITE_11_REPAIR,
    "CREATE UNIQUE INDEX IF NOT EXISTS outbox_order_status ON outbox(order_id, status)",
    "DROP INDEX IF EXISTS idx_outbox_idempotency_key",
    "DROP INDEX IF EXISTS idx_outbox_order_id_id",
)


def _sqlite_11(db: sqlite_utils.Database) -> None:
    """Pushes unique by order and status; no index on the idempotency key's text."""
    for statement in _SQLITE_11:
        db.execute(statement)


# Append only: a released migration never changes; user_version counts those applied.
SQLITE_MIGRATIONS: tuple[Callable[[sqlite_utils.Database], None], ...] = (
    _sqlite_1,
    _sqlite_2,
    _sqlite_3,
    _sqlite_4,
    _sqlite_5,
    _sqlite_6,
    _sqlite_7,
    _sqlite_8,
    _sqlite_9,
    _sqlite_10,
    _sqlite_11,
)


# PostgreSQL starts at the schema SQLite reached with migration 4, plus the cluster's
# own tables (instances and MQTT session slots). Each entry is one migration: a list of
# statements run in one transaction (PostgreSQL's DDL is transactional).
_PG_1 = (
    "CREATE TABLE orders (order_id text PRIMARY KEY, state text NOT NULL, courier_id text, "
    "updated_at text NOT NULL, hold_until double precision, status_at text, "
    "pickup_lat double precision, pickup_lng double precision, "
    "pickup_radius_m double precision, dropoff_lat double precision, "
    "dropoff_lng double precision, dropoff_radius_m double precision, store_id text, "
    "address_lat double precision, address_lng double precision, track text)",
    "CREATE INDEX orders_active ON orders(courier_id) "
    "WHERE courier_id IS NOT NULL AND state NOT IN ('dropoff', 'cancelled')",
    "CREATE INDEX orders_finished ON orders(updated_at) WHERE state IN ('dropoff', 'cancelled')",
    "CREATE INDEX orders_held ON orders(hold_until) WHERE hold_until IS NOT NULL",
    "CREATE TABLE transitions (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, "
    "order_id text NOT NULL, status text NOT NULL, inferred integer NOT NULL, "
    "event_id text, at text NOT NULL, recorded_at text NOT NULL, source text, "
    "lat double precision, lng double precision)",
    "CREATE INDEX transitions_order ON transitions(order_id, id)",
    "CREATE TABLE outbox (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, "
    "order_id text NOT NULL, status text NOT NULL, body text NOT NULL, "
    "idempotency_key text NOT NULL, state text NOT NULL DEFAULT 'pending', "
    "attempts integer NOT NULL DEFAULT 0, next_attempt_at double precision NOT NULL, "
    "last_error text, created_at double precision NOT NULL, "
    "delivered_at double precision, source text, claimed_by text, "
    "lease_until double precision)",
    "CREATE UNIQUE INDEX outbox_idempotency_key ON outbox(idempotency_key)",
    "CREATE INDEX outbox_order ON outbox(order_id, id)",
    "CREATE INDEX outbox_due ON outbox(next_attempt_at) WHERE state = 'pending'",
    "CREATE INDEX outbox_open ON outbox(order_id, id) WHERE state IN ('pending', 'failed')",
    "CREATE INDEX outbox_failed ON outbox(order_id, id) WHERE state = 'failed'",
    "CREATE INDEX outbox_held ON outbox(order_id) WHERE state = 'held'",
    "CREATE TABLE dead_letters (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, "
    "topic text NOT NULL, payload bytea NOT NULL, reason text NOT NULL, detail text, "
    "received_at text NOT NULL, size integer)",
    "CREATE INDEX dead_letters_received ON dead_letters(received_at)",
    "CREATE TABLE processed_events (event_id text PRIMARY KEY, order_id text, seen_at text)",
    "CREATE INDEX processed_events_order ON processed_events(order_id)",
    "CREATE TABLE couriers (courier_id text PRIMARY KEY, profile text, profile_at text, "
    "fix_ts text, lat double precision, lng double precision, "
    "accuracy_m double precision, speed_mps double precision, heading double precision, "
    "last_seen double precision, offline integer NOT NULL DEFAULT 0)",
    "CREATE INDEX couriers_online ON couriers(last_seen) WHERE offline = 0",
    "CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL)",
    "CREATE TABLE stores (merchant_supplied_id text PRIMARY KEY, lat double precision "
    "NOT NULL, lng double precision NOT NULL, radius_m double precision, "
    "updated_at text NOT NULL)",
    "CREATE TABLE track_points (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, "
    "courier_id text NOT NULL, ts text NOT NULL, lat double precision NOT NULL, "
    "lng double precision NOT NULL, accuracy_m double precision, recorded_at text NOT NULL)",
    "CREATE INDEX track_points_courier ON track_points(courier_id, ts)",
    "CREATE INDEX track_points_recorded ON track_points(recorded_at)",
    "CREATE TABLE notifications (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, "
    "topic text NOT NULL, payload text NOT NULL, created_at double precision NOT NULL)",
    "CREATE TABLE leases (name text PRIMARY KEY, holder text, until double precision)",
    # The cluster: live instances, and the MQTT session slots each one holds.
    "CREATE TABLE instances (instance_id text PRIMARY KEY, started_at double precision "
    "NOT NULL, heartbeat_at double precision NOT NULL, http text)",
    # lease_until: unused since membership went by heartbeat (store/cluster.py says why
    # it is not dropped yet).
    "CREATE TABLE slots (slot integer PRIMARY KEY, holder text, "
    "epoch bigint NOT NULL DEFAULT 0, lease_until double precision)",
)

# Append only, like SQLite's. 5 is reserved: a build of main between releases had a
# migration 5, reverted (ccb0a96, as SQLite's 10), and a database it opened is at 5;
# 6 undoes it (a no-op on any other).
POSTGRES_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    _PG_1,
    _EVENTS,
    (*_INTEGRITY, *_PG_EVENTS_PER_ORDER),
    _REPLAY,
    (),
    ("CREATE INDEX IF NOT EXISTS track_points_recorded ON track_points(recorded_at)",),
)

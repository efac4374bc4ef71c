"""The SQLite store: schema and migrations, the batch writer, outbox claims, reads.

One `Store` per thread (sqlite3 connections are not shared). WAL lets the order
commands and the daemon use the file at once; `synchronous=FULL` by default, because
group commit already pays for one fsync per batch rather than per message.
The hot path uses plain `execute`/`executemany`; sqlite-utils builds the schema.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from courierd.domain.lifecycle import validate_state
from courierd.domain.model import CANCELLED, Assignment, Input, Order, StatusEvent, dumps, iso
from courierd.domain.planner import Effects, Snapshot, plan_batch
from courierd.errors import StoreError

if TYPE_CHECKING:
    import sqlite_utils

PENDING, DELIVERED, FAILED, DROPPED = "pending", "delivered", "failed", "cancelled"
_CHUNK = 500  # bound on SQL parameters per IN (...) query


def _migration_1(db: sqlite_utils.Database) -> None:
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


# Append only: a released migration never changes; user_version counts those applied.
MIGRATIONS: tuple[Callable[[sqlite_utils.Database], None], ...] = (_migration_1,)


# Both halves use partial indexes (outbox_due, outbox_open): delivered rows cost nothing.
CLAIM_SQL = (
    "SELECT id, order_id, status, body, idempotency_key, attempts, created_at "
    "FROM outbox AS o WHERE state = 'pending' AND next_attempt_at <= ? "
    "AND NOT EXISTS (SELECT 1 FROM outbox AS p WHERE p.order_id = o.order_id "
    "AND p.state IN ('pending', 'failed') AND p.id < o.id) "
    "ORDER BY next_attempt_at, id LIMIT ?"
)


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A pending push claimed by the dispatcher."""

    id: int
    order_id: str
    status: str
    body: str
    idempotency_key: str
    attempts: int
    created_at: float


@dataclass(frozen=True, slots=True)
class PushResult:
    """How one attempt of a push ended, to be recorded."""

    id: int
    state: str  # PENDING (retry at next_attempt_at), DELIVERED or FAILED
    at: float
    next_attempt_at: float | None = None
    error: str | None = None


class Store:
    """A connection to the courierd database, migrated on open."""

    def __init__(self, path: Path | str, *, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        try:
            if str(path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={synchronous}")
            conn.execute("PRAGMA busy_timeout=10000")
            conn.execute("PRAGMA foreign_keys=ON")
            self.conn = conn
            self._migrate()
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"cannot open database {path}: {e}") from e

    def close(self) -> None:
        self.conn.close()

    @property
    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        with self.transaction():
            version = self.schema_version
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"database {self.path} has schema version {version}, newer than this "
                    f"courierd understands ({len(MIGRATIONS)}); upgrade courierd"
                )
            if version == len(MIGRATIONS):
                return
            import sqlite_utils  # only when there is schema to build: it costs ~13 MB

            db = sqlite_utils.Database(self.conn)
            for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
                migration(db)
                self.conn.execute(f"PRAGMA user_version={number}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT, or ROLLBACK on any error (then re-raised)."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise StoreError(f"cannot write to {self.path}: {e}") from e
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        try:
            self.conn.execute("COMMIT")
        except sqlite3.Error as e:
            self.conn.execute("ROLLBACK")
            raise StoreError(f"commit to {self.path} failed: {e}") from e

    # -- ingest -----------------------------------------------------------------------

    def commit_batch(self, inputs: Sequence[Input], *, now: float) -> Effects:
        """Decide a batch of inputs and write all its effects in one transaction.

        The rows are read inside the write transaction, so an order cancelled by the CLI
        a moment ago is seen as cancelled: nobody can change them between read and write.
        """
        now_iso = iso(now)
        order_ids, event_ids, courier_ids = [], [], []
        for item in inputs:
            if isinstance(item, StatusEvent):
                order_ids.append(item.order_id)
                event_ids.append(item.event_id)
                courier_ids.append(item.courier_id)
            elif isinstance(item, Assignment):
                order_ids.append(item.order_id)
        with self.transaction():
            snap = self.snapshot(order_ids, event_ids, courier_ids)
            fx = plan_batch(snap, inputs, received_at=now_iso)
            self.write(fx, now=now, now_iso=now_iso)
        return fx

    def snapshot(
        self, order_ids: Iterable[str], event_ids: Iterable[str], courier_ids: Iterable[str]
    ) -> Snapshot:
        """The rows a batch needs; call inside `transaction()` so nobody changes them."""
        snap = Snapshot()
        for chunk in _chunks(order_ids):
            for oid, state, courier in self.conn.execute(
                f"SELECT order_id, state, courier_id FROM orders WHERE order_id IN ({_qs(chunk)})",
                chunk,
            ):
                snap.orders[oid] = Order(oid, validate_state(state), courier)
        for chunk in _chunks(event_ids):
            snap.seen_event_ids.update(
                row[0]
                for row in self.conn.execute(
                    f"SELECT event_id FROM processed_events WHERE event_id IN ({_qs(chunk)})",
                    chunk,
                )
            )
        for chunk in _chunks(courier_ids):
            for cid, profile in self.conn.execute(
                f"SELECT courier_id, profile FROM couriers WHERE courier_id IN ({_qs(chunk)}) "
                "AND profile IS NOT NULL",
                chunk,
            ):
                snap.profiles[cid] = json.loads(profile)
        return snap

    def write(self, fx: Effects, *, now: float, now_iso: str) -> None:
        """Write every effect of a batch; call inside `transaction()` (one commit)."""
        c = self.conn
        c.executemany(
            "INSERT INTO orders (order_id, state, courier_id, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (order_id) DO UPDATE SET state = excluded.state, "
            "courier_id = excluded.courier_id, updated_at = excluded.updated_at",
            [(o.order_id, o.state, o.courier_id, now_iso) for o in fx.orders.values()],
        )
        c.executemany(
            "INSERT INTO transitions (order_id, status, inferred, event_id, at, recorded_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [
                (t.order_id, t.status.value, int(t.inferred), t.event_id, t.at, now_iso)
                for t in fx.transitions
            ],
        )
        c.executemany(
            "INSERT OR IGNORE INTO outbox (order_id, status, body, idempotency_key, state, "
            "attempts, next_attempt_at, created_at) VALUES (?, ?, ?, ?, 'pending', 0, ?, ?)",
            [(p.order_id, p.status.value, p.body, p.idempotency_key, now, now) for p in fx.pushes],
        )
        c.executemany(
            "INSERT INTO dead_letters (topic, payload, reason, detail, received_at) "
            "VALUES (?, ?, ?, ?, ?)",
            [(d.topic, d.payload, d.reason, d.detail, now_iso) for d in fx.dead_letters],
        )
        c.executemany(
            "INSERT OR IGNORE INTO processed_events (event_id) VALUES (?)",
            [(e,) for e in fx.event_ids],
        )
        c.executemany(
            "INSERT INTO couriers (courier_id, profile, profile_at) VALUES (?, ?, ?) "
            "ON CONFLICT (courier_id) DO UPDATE SET profile = excluded.profile, "
            "profile_at = excluded.profile_at",
            [
                (cid, None if info is None else dumps(info), now_iso)
                for cid, info in fx.profiles.items()
            ],
        )
        # Pings arrive out of order too: an older fix never replaces a newer one.
        c.executemany(
            "INSERT INTO couriers (courier_id, fix_ts, lat, lng, accuracy_m, speed_mps, heading) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (courier_id) DO UPDATE SET "
            "fix_ts = excluded.fix_ts, lat = excluded.lat, lng = excluded.lng, "
            "accuracy_m = excluded.accuracy_m, speed_mps = excluded.speed_mps, "
            "heading = excluded.heading "
            "WHERE couriers.fix_ts IS NULL OR excluded.fix_ts >= couriers.fix_ts",
            [
                (f.courier_id, f.ts, f.lat, f.lng, f.accuracy_m, f.speed_mps, f.heading)
                for f in fx.locations.values()
            ],
        )

    # -- dispatch ---------------------------------------------------------------------

    def claim_due(self, now: float, limit: int, busy: Sequence[int] = ()) -> list[OutboxRow]:
        """Due pushes that head their order's queue; `busy` are ids already in flight.

        A push waits while an earlier push of the same order is pending or parked as
        failed: that is what keeps every order's statuses in chain order.
        """
        rows = self.conn.execute(CLAIM_SQL, (now, limit + len(busy))).fetchall()
        skip = set(busy)
        return [OutboxRow(*r) for r in rows if r[0] not in skip][:limit]

    def next_due_after(self, now: float) -> float | None:
        """When the next pending push that is not due at `now` becomes due."""
        row = self.conn.execute(
            "SELECT min(next_attempt_at) FROM outbox WHERE state = 'pending' "
            "AND next_attempt_at > ?",
            (now,),
        ).fetchone()
        return None if row[0] is None else float(row[0])

    def record_results(self, results: Iterable[PushResult]) -> None:
        """Record attempts in one commit; a push cancelled meanwhile stays cancelled."""
        results = list(results)
        if not results:
            return
        with self.transaction() as c:
            c.executemany(
                "UPDATE outbox SET state = ?, attempts = attempts + 1, last_error = ?, "
                "next_attempt_at = coalesce(?, next_attempt_at), "
                "delivered_at = CASE WHEN ? = 'delivered' THEN ? END "
                "WHERE id = ? AND state = 'pending'",
                [(r.state, r.error, r.next_attempt_at, r.state, r.at, r.id) for r in results],
            )

    def outbox_stats(self) -> tuple[int, float | None, int]:
        """(pending pushes, created_at of the oldest pending, failed pushes)."""
        pending, oldest = self.conn.execute(
            "SELECT count(*), min(created_at) FROM outbox WHERE state = 'pending'"
        ).fetchone()
        failed = self.conn.execute("SELECT count(*) FROM outbox WHERE state = 'failed'").fetchone()[
            0
        ]
        return int(pending), oldest, int(failed)

    # -- order commands ---------------------------------------------------------------

    def get_order(self, order_id: str) -> Order | None:
        row = self.conn.execute(
            "SELECT state, courier_id FROM orders WHERE order_id = ?", (order_id,)
        ).fetchone()
        return None if row is None else Order(order_id, validate_state(row[0]), row[1])

    def save_cancel(self, order: Order, now_iso: str) -> int:
        """Store the cancelled order and drop its unsent pushes; returns how many."""
        assert order.state == CANCELLED
        with self.transaction() as c:
            c.execute(
                "INSERT INTO orders (order_id, state, courier_id, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (order_id) DO UPDATE SET state = excluded.state, "
                "updated_at = excluded.updated_at",
                (order.order_id, order.state, order.courier_id, now_iso),
            )
            dropped = c.execute(
                "UPDATE outbox SET state = 'cancelled', last_error = 'order cancelled' "
                "WHERE order_id = ? AND state IN ('pending', 'failed')",
                (order.order_id,),
            ).rowcount
        return int(dropped)

    def order_view(self, order_id: str) -> dict[str, Any] | None:
        """The JSON `courierd order show` prints (CONTRACT.md section 1)."""
        order = self.get_order(order_id)
        if order is None:
            return None
        transitions = [
            {"status": s, "at": at, "inferred": bool(inf), "event_id": eid}
            for s, at, inf, eid in self.conn.execute(
                "SELECT status, at, inferred, event_id FROM transitions WHERE order_id = ? "
                "ORDER BY id",
                (order_id,),
            )
        ]
        pushes = [
            {
                "status": s,
                "state": st,
                "delivered": st == DELIVERED,
                "attempts": n,
                "last_error": err,
                "idempotency_key": key,
            }
            for s, st, n, err, key in self.conn.execute(
                "SELECT status, state, attempts, last_error, idempotency_key FROM outbox "
                "WHERE order_id = ? ORDER BY id",
                (order_id,),
            )
        ]
        return {
            "order_id": order_id,
            "state": order.state,
            "courier_id": order.courier_id,
            "cancelled": order.cancelled,
            "transitions": transitions,
            "pushes": pushes,
        }


class PendingCheck:
    """Answers "is this push still pending?" from any thread, on its own read-only
    connection: a push claimed a moment ago may have been cancelled since."""

    def __init__(self, path: Path) -> None:
        self.uri = Path(path).resolve().as_uri() + "?mode=ro"
        self._local = threading.local()

    def __call__(self, push_id: int) -> bool:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = sqlite3.connect(self.uri, uri=True)
        row = conn.execute("SELECT state FROM outbox WHERE id = ?", (push_id,)).fetchone()
        return row is not None and row[0] == PENDING


def _chunks(values: Iterable[str]) -> Iterator[list[str]]:
    items = list(dict.fromkeys(values))
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


def _qs(chunk: Sequence[Any]) -> str:
    return ",".join("?" * len(chunk))

"""The batch writer: read the rows a batch touches, plan it, write every effect at once.

One transaction per batch (group commit): orders, transitions, outbox rows, dead
letters, event ids and courier rows are committed together, and only then does the
MQTT process acknowledge the batch. The rows are read inside the write transaction, so
nothing (an `order cancel`, another instance) changes them between read and write.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from courierd.domain.lifecycle import valid_state
from courierd.domain.model import Assignment, Input, Order, StatusEvent, dumps, iso
from courierd.domain.planner import Effects, Snapshot, plan_batch
from courierd.store.db import Database, chunks, placeholders
from courierd.store.schema import HELD, PENDING

# Dead letters keep the start of the payload (enough to see what an app sent) and its size.
DEAD_LETTER_KEEP = 4096


def safe_text(text: str) -> str:
    """Any exception text, made storable (lone surrogates escaped, NUL dropped)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "")


class BatchWriter:
    """Commits batches of parsed inputs; see the module text."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def commit(self, inputs: Sequence[Input], *, now: float) -> Effects:
        """Decide a batch of inputs and write all its effects in one transaction."""
        now_iso = iso(now)
        order_ids, event_ids, courier_ids = [], [], []
        for item in inputs:
            if isinstance(item, StatusEvent):
                order_ids.append(item.order_id)
                event_ids.append(item.event_id)
                courier_ids.append(item.courier_id)
            elif isinstance(item, Assignment):
                order_ids.append(item.order_id)
        with self.db.transaction():
            snap = self.snapshot(order_ids, event_ids, courier_ids, now=now)
            fx = plan_batch(snap, inputs, received_at=now_iso)
            self.write(fx, snap, now=now, now_iso=now_iso)
        return fx

    def snapshot(
        self,
        order_ids: Iterable[str],
        event_ids: Iterable[str],
        courier_ids: Iterable[str],
        *,
        now: float,
    ) -> Snapshot:
        """The rows a batch needs; call inside `transaction()` so nobody changes them."""
        snap = Snapshot()
        db = self.db
        # Sorted: instances sharing a PostgreSQL database lock rows in the same order.
        for chunk in chunks(sorted(set(order_ids))):
            for oid, state, courier, hold_until in db.rows(
                "SELECT order_id, state, courier_id, hold_until FROM orders "
                f"WHERE order_id IN ({placeholders(chunk)}) ORDER BY order_id{db.for_update}",
                chunk,
            ):
                if not valid_state(state):
                    snap.corrupt_orders.add(oid)
                    continue
                held = hold_until is not None and hold_until > now
                snap.orders[oid] = Order(oid, state, courier, held)
        for chunk in chunks(event_ids):
            snap.seen_event_ids.update(
                row[0]
                for row in db.rows(
                    "SELECT event_id FROM processed_events "
                    f"WHERE event_id IN ({placeholders(chunk)})",
                    chunk,
                )
            )
        for chunk in chunks(courier_ids):
            for cid, profile in db.rows(
                "SELECT courier_id, profile FROM couriers "
                f"WHERE courier_id IN ({placeholders(chunk)}) AND profile IS NOT NULL",
                chunk,
            ):
                try:
                    info = json.loads(profile)
                except (TypeError, ValueError, RecursionError):
                    info = None
                if isinstance(info, dict):
                    snap.profiles[cid] = info
                else:
                    snap.corrupt_profiles.add(cid)
        return snap

    def write(self, fx: Effects, snap: Snapshot, *, now: float, now_iso: str) -> None:
        """Write every effect of a batch; call inside `transaction()` (one commit)."""
        db = self.db
        db.executemany(
            "INSERT INTO orders (order_id, state, courier_id, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (order_id) DO UPDATE SET state = excluded.state, "
            "courier_id = excluded.courier_id, updated_at = excluded.updated_at",
            [(o.order_id, o.state, o.courier_id, now_iso) for o in fx.orders.values()],
        )
        db.executemany(
            "INSERT INTO transitions (order_id, status, inferred, event_id, at, recorded_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [
                (t.order_id, t.status.value, int(t.inferred), t.event_id, t.at, now_iso)
                for t in fx.transitions
            ],
        )
        # A push of an order whose cancel is in progress waits ("held") for its outcome.
        held = {oid for oid, o in {**snap.orders, **fx.orders}.items() if o.held}
        db.executemany(
            "INSERT INTO outbox (order_id, status, body, idempotency_key, state, "
            "attempts, next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, 0, ?, ?) "
            "ON CONFLICT (idempotency_key) DO NOTHING",
            [
                (
                    p.order_id,
                    p.status.value,
                    p.body,
                    p.idempotency_key,
                    HELD if p.order_id in held else PENDING,
                    now,
                    now,
                )
                for p in fx.pushes
            ],
        )
        db.executemany(
            "INSERT INTO dead_letters (topic, payload, reason, detail, received_at, size) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [
                (
                    safe_text(d.topic),
                    d.payload[:DEAD_LETTER_KEEP],
                    d.reason,
                    safe_text(d.detail),
                    now_iso,
                    len(d.payload) if d.size is None else d.size,
                )
                for d in fx.dead_letters
            ],
        )
        db.executemany(
            "INSERT INTO processed_events (event_id, order_id, seen_at) VALUES (?, ?, ?) "
            "ON CONFLICT (event_id) DO NOTHING",
            [(e, order_id, now_iso) for e, order_id in fx.event_ids.items()],
        )
        db.executemany(
            "INSERT INTO couriers (courier_id, profile, profile_at) VALUES (?, ?, ?) "
            "ON CONFLICT (courier_id) DO UPDATE SET profile = excluded.profile, "
            "profile_at = excluded.profile_at",
            [
                (cid, None if info is None else dumps(info), now_iso)
                for cid, info in fx.profiles.items()
            ],
        )
        # Pings arrive out of order too: an older fix never replaces a newer one.
        db.executemany(
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

    def heartbeat(self, now: float) -> None:
        """A real write and commit: proves the database takes writes (health's probe)."""
        with self.db.transaction():
            self.db.execute(
                "INSERT INTO meta (key, value) VALUES ('heartbeat', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (iso(now),),
            )

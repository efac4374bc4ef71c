"""What `courierd replay` and `courierd stores suggest` read: orders' accepted fixes,
the statuses decided, and the places. Reads only (the commands open the store read-only).

The fixes an order's rules consumed are, for each of its segments (`orders.consumed`:
courier, first fix ts, count), that courier's kept fixes from the first on, in `ts`
order, as many as were consumed (CONTRACT.md 13). Orders are read a chunk at a time, so
a replay of millions of fixes holds one chunk's rows in memory, not all of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from courierd.domain.model import LocationFix, Place, Status
from courierd.domain.pickup import Suggestion, suggest
from courierd.domain.planner import Places
from courierd.domain.replay import History, app_statuses, decided
from courierd.errors import StoreError
from courierd.store.db import Database, chunks, placeholders
from courierd.store.writer import read_consumed

CHUNK = 200  # orders read per round trip


@dataclass(slots=True)
class Visit:
    """One order's stay at its store: the fixes between arrived_at_store and
    dasher_out_for_delivery (lat, lng)."""

    order_id: str
    points: list[tuple[float, float]] = field(default_factory=list)


class ReplayReads:
    """Reads for replay and the pickup-point suggestions, over one database."""

    def __init__(self, db: Database) -> None:
        self.db = db
        try:
            db.rows("SELECT consumed FROM orders WHERE 1 = 0")
            db.rows("SELECT fixes FROM transitions WHERE 1 = 0")
        except Exception as e:
            raise StoreError(
                f"database {db.location} predates replay: start this version's daemon "
                "once to migrate it"
            ) from e

    def order_ids(
        self, wanted: Sequence[str] = (), since: str | None = None, until: str | None = None
    ) -> list[str]:
        """Orders whose rules consumed fixes, in the order of their first one; only
        `wanted` ones if given; only those whose first fix is at or after `since` and
        before `until` (stored UTC text)."""
        sql = "SELECT order_id, consumed FROM orders WHERE consumed IS NOT NULL"
        if wanted:
            rows = [
                row
                for chunk in chunks(wanted)
                for row in self.db.rows(f"{sql} AND order_id IN ({placeholders(chunk)})", chunk)
            ]
        else:
            rows = self.db.rows(sql)
        firsts = []
        for oid, text in rows:
            try:
                segments = read_consumed(text)
            except ValueError:
                continue  # unreadable: nothing to replay
            if segments:
                firsts.append((segments[0][1], oid))
        return [
            oid
            for first, oid in sorted(firsts)
            if (since is None or first >= since) and (until is None or first < until)
        ]

    def known(self, order_id: str) -> bool:
        """Whether the order exists at all (with or without fixes to replay)."""
        return self.db.row("SELECT 1 FROM orders WHERE order_id = ?", (order_id,)) is not None

    def decided_where(self, order_id: str) -> dict[str, tuple[float, float]]:
        """Where each geofence status of the order fired live (status → lat, lng)."""
        return {
            status: (lat, lng)
            for status, lat, lng in self.db.rows(
                "SELECT status, lat, lng FROM transitions WHERE order_id = ? AND "
                "source = 'geofence' AND lat IS NOT NULL AND lng IS NOT NULL ORDER BY id",
                (order_id,),
            )
        }

    def histories(self, order_ids: Sequence[str]) -> Iterator[History]:
        """Each order's `History`, in the order given."""
        for chunk in chunks(order_ids, CHUNK):
            qs = placeholders(chunk)
            histories = {oid: History(oid, Places()) for oid in chunk}
            segments: dict[str, Any] = {}
            for row in self.db.rows(
                "SELECT o.order_id, o.pickup_lat, o.pickup_lng, o.pickup_radius_m, s.lat, "
                "s.lng, s.radius_m, o.dropoff_lat, o.dropoff_lng, o.dropoff_radius_m, "
                "o.address_lat, o.address_lng, o.consumed FROM orders AS o LEFT JOIN stores "
                f"AS s ON s.merchant_supplied_id = o.store_id WHERE o.order_id IN ({qs})",
                chunk,
            ):
                (oid, p_lat, p_lng, p_rad, s_lat, s_lng, s_rad, d_lat, d_lng, d_rad, a_lat,
                 a_lng, consumed) = row  # fmt: skip
                pickup = _place(p_lat, p_lng, p_rad) or _place(s_lat, s_lng, s_rad)
                dropoff = _place(d_lat, d_lng, d_rad) or _place(a_lat, a_lng, None)
                histories[oid].places = Places(pickup, dropoff)
                try:
                    segments[oid] = read_consumed(consumed) if consumed is not None else ()
                except ValueError:
                    segments[oid] = ()
            transitions: dict[str, list[tuple[Any, ...]]] = {}
            for oid, status, at, source, fixes, clocked in self.db.rows(
                "SELECT order_id, status, at, source, fixes, clocked FROM transitions "
                f"WHERE order_id IN ({qs}) ORDER BY order_id, id",
                chunk,
            ):
                transitions.setdefault(oid, []).append((status, at, source, fixes, clocked))
            for oid, rows in transitions.items():
                histories[oid].app = app_statuses(rows)
                histories[oid].was = decided((s, at, src) for s, at, src, _, _ in rows)
            for oid in chunk:
                history = histories[oid]
                for courier, first, count in segments.get(oid, ()):
                    found = self.db.rows(
                        "SELECT ts, lat, lng, accuracy_m FROM track_points WHERE "
                        "courier_id = ? AND ts >= ? ORDER BY ts, id LIMIT ?",
                        (courier, first, count),
                    )
                    if not found or found[0][0] != first:
                        # Its first fix is gone: retention prunes the oldest first, so
                        # what follows it may be the courier's later fixes (another
                        # order's). None of the segment is replayed; all of it is missing.
                        history.missing += count
                        continue
                    history.missing += count - len(found)
                    history.starts.add(len(history.fixes))
                    history.fixes += [LocationFix(courier, *r) for r in found]
                yield history

    def visits(self) -> dict[str, tuple[Place, list[Visit]]]:
        """Per registered store: its point, and each order's stay there (fixes from the
        order's arrived_at_store to its dasher_out_for_delivery, or on if it has not left)."""
        stores: dict[str, tuple[Place, list[Visit]]] = {
            sid: (Place(lat, lng, radius), [])
            for sid, lat, lng, radius in self.db.rows(
                "SELECT merchant_supplied_id, lat, lng, radius_m FROM stores"
            )
        }
        store_of = {
            oid: sid
            for oid, sid in self.db.rows(
                "SELECT order_id, store_id FROM orders WHERE store_id IS NOT NULL "
                "AND consumed IS NOT NULL"
            )
            if sid in stores
        }
        if not store_of:
            return stores  # (no order ids would mean every order to order_ids)
        arrived, left = Status.ARRIVED_AT_STORE, Status.DASHER_OUT_FOR_DELIVERY
        for history in self.histories(self.order_ids(sorted(store_of))):
            declared = {a.status: a.at for a in history.app}
            start = history.was.get(arrived) or declared.get(arrived)
            end = history.was.get(left) or declared.get(left)
            if start is None:
                continue
            visit = Visit(history.order_id)
            visit.points = [
                (f.lat, f.lng)
                for f in history.fixes
                if f.ts >= start and (end is None or f.ts <= end)
            ]
            if visit.points:
                stores[store_of[history.order_id]][1].append(visit)
        return stores

    def suggestions(self, min_orders: int) -> list[tuple[Place, Suggestion]]:
        """Per registered store with at least `min_orders` stays (by id): its registered
        point and the pickup point its couriers' stays suggest (domain/pickup.py)."""
        stores = self.visits()
        found = []
        for sid in sorted(stores):
            registered, visits = stores[sid]
            if len(visits) < min_orders:
                continue
            s = suggest(sid, registered, [v.points for v in visits])
            if s is not None and all(math.isfinite(x) for x in (s.lat, s.lng, s.radius_m)):
                found.append((registered, s))
        return found


def _place(lat: Any, lng: Any, radius: Any) -> Place | None:
    return None if lat is None or lng is None else Place(lat, lng, radius)

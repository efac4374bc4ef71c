"""What `courierd replay` and `courierd stores suggest` read: orders' accepted fixes,
the statuses decided, and the places. Reads only (the commands open the store read-only).

The accepted fixes of an order are the `track_points` rows naming it, in `id` order: the
order its rules consumed them (CONTRACT.md 13). Orders are read a chunk at a time, so a
replay of millions of fixes holds one chunk's rows in memory, not all of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from courierd.domain.model import LocationFix, Place, Status
from courierd.domain.planner import Places
from courierd.domain.replay import History, app_statuses, decided
from courierd.errors import StoreError
from courierd.store.db import Database, chunks, placeholders

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
            db.rows("SELECT order_id FROM track_points WHERE 1 = 0")
            db.rows("SELECT fixes FROM transitions WHERE 1 = 0")
        except Exception as e:
            raise StoreError(
                f"database {db.location} predates replay: start this version's daemon "
                "once to migrate it"
            ) from e

    def order_ids(
        self, wanted: Sequence[str] = (), since: str | None = None, until: str | None = None
    ) -> list[str]:
        """Orders with accepted fixes, in the order of their first one; only `wanted`
        ones if given; only those whose first fix is at or after `since` and before
        `until` (stored UTC text). That order is also the order the rows were written
        in, so reading orders chunk by chunk reads the table's pages about once."""
        sql = "SELECT order_id, min(ts), min(id) FROM track_points WHERE order_id IS NOT NULL"
        if wanted:
            rows = [
                row
                for chunk in chunks(wanted)
                for row in self.db.rows(
                    f"{sql} AND order_id IN ({placeholders(chunk)}) GROUP BY order_id", chunk
                )
            ]
        else:
            rows = self.db.rows(f"{sql} GROUP BY order_id")
        return [
            oid
            for oid, first, _ in sorted(rows, key=lambda row: row[2])
            if (since is None or first >= since) and (until is None or first < until)
        ]

    def histories(self, order_ids: Sequence[str]) -> Iterator[History]:
        """Each order's `History`, in the order given."""
        for chunk in chunks(order_ids, CHUNK):
            qs = placeholders(chunk)
            histories = {oid: History(oid, Places()) for oid in chunk}
            for row in self.db.rows(
                "SELECT o.order_id, o.pickup_lat, o.pickup_lng, o.pickup_radius_m, s.lat, "
                "s.lng, s.radius_m, o.dropoff_lat, o.dropoff_lng, o.dropoff_radius_m, "
                "o.address_lat, o.address_lng FROM orders AS o LEFT JOIN stores AS s "
                f"ON s.merchant_supplied_id = o.store_id WHERE o.order_id IN ({qs})",
                chunk,
            ):
                oid, p_lat, p_lng, p_rad, s_lat, s_lng, s_rad, d_lat, d_lng, d_rad, a_lat, a_lng = (
                    row
                )
                pickup = _place(p_lat, p_lng, p_rad) or _place(s_lat, s_lng, s_rad)
                dropoff = _place(d_lat, d_lng, d_rad) or _place(a_lat, a_lng, None)
                histories[oid].places = Places(pickup, dropoff)
            transitions: dict[str, list[tuple[Any, ...]]] = {}
            for oid, status, at, source, fixes in self.db.rows(
                "SELECT order_id, status, at, source, fixes FROM transitions "
                f"WHERE order_id IN ({qs}) ORDER BY order_id, id",
                chunk,
            ):
                transitions.setdefault(oid, []).append((status, at, source, fixes))
            for oid, rows in transitions.items():
                histories[oid].app = app_statuses(rows)
                histories[oid].was = decided((s, at, src) for s, at, src, _ in rows)
            for oid, courier, ts, lat, lng, acc in self.db.rows(
                "SELECT order_id, courier_id, ts, lat, lng, accuracy_m FROM track_points "
                f"WHERE order_id IN ({qs}) ORDER BY order_id, id",
                chunk,
            ):
                histories[oid].fixes.append(LocationFix(courier, ts, lat, lng, acc))
            yield from (histories[oid] for oid in chunk)

    def visits(self) -> dict[str, tuple[Place, list[Visit]]]:
        """Per registered store: its point, and each order's stay there (fixes from the
        order's arrived_at_store to its dasher_out_for_delivery, or on if it has not left)."""
        stores: dict[str, tuple[Place, list[Visit]]] = {
            sid: (Place(lat, lng, radius), [])
            for sid, lat, lng, radius in self.db.rows(
                "SELECT merchant_supplied_id, lat, lng, radius_m FROM stores"
            )
        }
        stays: dict[str, tuple[str, str, str | None]] = {}  # order → store, from, until
        for oid, sid, status, at in self.db.rows(
            "SELECT o.order_id, o.store_id, t.status, t.at FROM orders AS o JOIN transitions "
            "AS t ON t.order_id = o.order_id WHERE o.store_id IS NOT NULL AND t.status IN "
            f"('{Status.ARRIVED_AT_STORE.value}', '{Status.DASHER_OUT_FOR_DELIVERY.value}')"
        ):
            if sid not in stores:
                continue
            _, start, end = stays.get(oid, (sid, "", None))
            if status == Status.ARRIVED_AT_STORE.value:
                start = at
            else:
                end = at
            stays[oid] = (sid, start, end)
        for chunk in chunks(sorted(o for o, (_, start, _) in stays.items() if start)):
            visits: dict[str, Visit] = {}
            for oid, ts, lat, lng in self.db.rows(
                "SELECT order_id, ts, lat, lng FROM track_points "
                f"WHERE order_id IN ({placeholders(chunk)}) ORDER BY order_id, id",
                chunk,
            ):
                sid, start, end = stays[oid]
                if ts >= start and (end is None or ts <= end):
                    visits.setdefault(oid, Visit(oid)).points.append((lat, lng))
            for visit in visits.values():
                stores[stays[visit.order_id][0]][1].append(visit)
        return stores


def _place(lat: Any, lng: Any, radius: Any) -> Place | None:
    return None if lat is None or lng is None else Place(lat, lng, radius)

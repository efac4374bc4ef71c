"""Where orders are picked up and dropped off: the store registry and what `order
submit` learned about each order (CONTRACT.md 7, "Places")."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from courierd.domain.model import Place, iso
from courierd.domain.order_schema import OrderFacts
from courierd.store.db import Database


class Registry:
    """Stores and submitted orders' places, on one connection."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def record_order(self, facts: OrderFacts, now: float) -> None:
        """Keep the order's store id and delivery point (creating the order if new)."""
        lat, lng = facts.address if facts.address is not None else (None, None)
        with self.db.transaction():
            self.db.execute(
                "INSERT INTO orders (order_id, state, updated_at, store_id, address_lat, "
                "address_lng) VALUES (?, 'new', ?, ?, ?, ?) ON CONFLICT (order_id) DO UPDATE "
                "SET store_id = excluded.store_id, address_lat = excluded.address_lat, "
                "address_lng = excluded.address_lng",
                (facts.order_id, iso(now), facts.store_id, lat, lng),
            )

    def import_stores(self, stores: Iterable[tuple[str, Place]], now: float) -> int:
        """Insert or replace stores, all in one transaction; how many."""
        rows = [(sid, p.lat, p.lng, p.radius_m, iso(now)) for sid, p in stores]
        with self.db.transaction():
            self.db.executemany(
                "INSERT INTO stores (merchant_supplied_id, lat, lng, radius_m, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (merchant_supplied_id) DO UPDATE SET "
                "lat = excluded.lat, lng = excluded.lng, radius_m = excluded.radius_m, "
                "updated_at = excluded.updated_at",
                rows,
            )
        return len(rows)

    def stores(self, limit: int = 10_000) -> list[dict[str, Any]]:
        return [
            {"merchant_supplied_id": sid, "lat": lat, "lng": lng, "radius_m": r, "updated_at": at}
            for sid, lat, lng, r, at in self.db.rows(
                "SELECT merchant_supplied_id, lat, lng, radius_m, updated_at FROM stores "
                "ORDER BY merchant_supplied_id LIMIT ?",
                (limit,),
            )
        ]

"""MQTT messages courierd publishes (alerts, order events), and the offline watchdog.

Notifications are a second outbox: written in the same transaction as whatever caused
them, published QoS 1 by the dispatch process, deleted once the broker acknowledged
them (at least once, in the order they were written).

The watchdog (CONTRACT.md 9) reports a courier offline when it has an active order and
nothing valid of its has arrived for `offline_after_s` by courierd's clock. The flag
and the alert are written in one transaction, guarded by `offline = 0`: one alert per
silence, however many checks (or instances) run.
"""

from __future__ import annotations

from dataclasses import dataclass

from courierd.domain.lifecycle import active_sql
from courierd.domain.model import dumps, iso
from courierd.domain.planner import ALERTS_TOPIC
from courierd.store.db import Database

ACTIVE, ACTIVE_O = active_sql(), active_sql("o.state")


@dataclass(frozen=True, slots=True)
class Notice:
    """One message to publish."""

    id: int
    topic: str
    payload: str


class Notices:
    """The notification outbox and the offline watchdog, on one connection."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def due(self, limit: int = 100) -> list[Notice]:
        """The oldest unpublished notifications, in the order they were written."""
        return [
            Notice(*row)
            for row in self.db.rows(
                "SELECT id, topic, payload FROM notifications ORDER BY id LIMIT ?", (limit,)
            )
        ]

    def published(self, ids: list[int]) -> None:
        if not ids:
            return
        with self.db.transaction():
            self.db.executemany("DELETE FROM notifications WHERE id = ?", [(i,) for i in ids])

    def pending(self) -> int:
        return int(self.db.value("SELECT count(*) FROM notifications"))

    def report_silent(self, now: float, offline_after_s: float) -> list[str]:
        """Mark couriers silent for `offline_after_s` offline and write one alert each;
        returns their ids. A courier never heard from is not reported."""
        with self.db.transaction():
            silent = [
                (row[0], row[1])
                for row in self.db.rows(
                    "SELECT c.courier_id, c.last_seen FROM couriers AS c "
                    "WHERE c.offline = 0 AND c.last_seen < ? AND EXISTS (SELECT 1 FROM orders "
                    f"AS o WHERE o.courier_id = c.courier_id AND {ACTIVE_O}) "
                    f"ORDER BY c.courier_id{self.db.for_update}",
                    (now - offline_after_s,),
                )
            ]
            reported = []
            for courier_id, last_seen in silent:
                if not self.db.changed(
                    "UPDATE couriers SET offline = 1 WHERE courier_id = ? AND offline = 0",
                    (courier_id,),
                ):
                    continue
                orders = [
                    r[0]
                    for r in self.db.rows(
                        f"SELECT order_id FROM orders WHERE courier_id = ? AND {ACTIVE} "
                        "ORDER BY order_id",
                        (courier_id,),
                    )
                ]
                payload = {
                    "type": "courier_offline",
                    "courier_id": courier_id,
                    "order_ids": orders,
                    "last_seen": iso(last_seen),
                    "at": iso(now),
                }
                self.db.execute(
                    "INSERT INTO notifications (topic, payload, created_at) VALUES (?, ?, ?)",
                    (ALERTS_TOPIC, dumps(payload), now),
                )
                reported.append(courier_id)
        return reported

    def offline_count(self) -> int:
        """Couriers reported offline that still have active orders (the gauge)."""
        return int(
            self.db.value(
                "SELECT count(*) FROM couriers AS c WHERE c.offline = 1 AND EXISTS (SELECT 1 "
                f"FROM orders AS o WHERE o.courier_id = c.courier_id AND {ACTIVE_O})"
            )
        )

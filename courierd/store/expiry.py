"""Abandoned orders expire (CONTRACT.md 12): nothing happened to them for too long.

An order that is not finished, with no change for `store.abandon_after_h` hours
(`orders.updated_at`: transitions, assignments, OneTablet's events, submission) and
whose courier sent no accepted fix for as long (`couriers.fix_at`), becomes `expired`:
a terminal local state. Nothing is pushed for it (OneTablet's order is not touched);
pushes it already had still go. It leaves the active set (watchdog, API, page), and
retention prunes it like a finished order, counted from when it expired. Later events
for it are dead letters (`expired`), like a cancelled order's. An order whose cancel is
in progress waits for the cancel's outcome.
"""

from __future__ import annotations

from courierd.domain.lifecycle import active_sql
from courierd.domain.model import EXPIRED, iso
from courierd.store.db import Database, placeholders

BATCH = 500  # orders per transaction: a step stays short beside the ingest writer


class Expiry:
    """Marks abandoned orders expired; `step` until it returns fewer than BATCH."""

    def __init__(self, db: Database, abandon_after_s: float) -> None:
        self.db = db
        self.abandon_after_s = abandon_after_s

    def step(self, now: float) -> list[str]:
        """One transaction: expire up to BATCH abandoned orders; their ids."""
        cutoff = now - self.abandon_after_s
        db = self.db
        with db.transaction():
            # Sorted by order id, as the ingest writer locks orders (PostgreSQL).
            ids = [
                row[0]
                for row in db.rows(
                    f"SELECT order_id FROM orders AS o WHERE {active_sql()} "
                    "AND updated_at < ? AND hold_until IS NULL AND NOT EXISTS (SELECT 1 "
                    "FROM couriers AS c WHERE c.courier_id = o.courier_id AND c.fix_at >= ?) "
                    f"ORDER BY order_id LIMIT ?{db.for_update_of('o')}",
                    (iso(cutoff), cutoff, BATCH),
                )
            ]
            if ids:
                db.execute(
                    f"UPDATE orders SET state = ?, updated_at = ? WHERE order_id IN "
                    f"({placeholders(ids)})",
                    [EXPIRED, iso(now), *ids],
                )
        return ids

"""What OneTablet tells courierd about orders (CONTRACT.md 11), applied in one transaction:
the event id (a repeat changes nothing), the order's record or cancellation, and the
notifications for its courier and dispatch. The webhook listener answers 200 only after
this committed."""

from __future__ import annotations

from courierd.domain.model import CANCELLED, iso
from courierd.domain.restaurant import (
    DISPATCH_TOPIC,
    Kind,
    RestaurantEvent,
    cancels,
    courier_topic,
    message,
)
from courierd.store.db import Database


class Inbound:
    """OneTablet's events, on one connection."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def apply(self, event: RestaurantEvent, now: float) -> bool:
        """Apply the event; False if its id was seen before (nothing happened again)."""
        at = iso(now)
        db = self.db
        with db.transaction():
            if event.event_id is not None and not db.changed(
                "INSERT INTO onetablet_events (event_id, order_id, type, received_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING",
                (event.event_id, event.order_id, event.kind.value, at),
            ):
                return False
            # Recorded even for an order courierd has not seen: a courier bound later is
            # still told (planner.py, on binding).
            db.execute(
                "INSERT INTO orders (order_id, state, updated_at) VALUES (?, 'new', ?) "
                "ON CONFLICT (order_id) DO NOTHING",
                (event.order_id, at),
            )
            state, courier, confirmed_at, ready_at = db.row(
                "SELECT state, courier_id, confirmed_at, ready_at FROM orders WHERE order_id = ?"
                + db.for_update,
                (event.order_id,),
            ) or ("new", None, None, None)
            if event.kind is Kind.CONFIRMED and confirmed_at is None:
                db.execute(
                    "UPDATE orders SET confirmed_at = ? WHERE order_id = ?", (at, event.order_id)
                )
            elif event.kind is Kind.READY and ready_at is None:
                db.execute(
                    "UPDATE orders SET ready_at = ? WHERE order_id = ?", (at, event.order_id)
                )
            elif cancels(event.kind, state):
                db.execute(
                    "UPDATE orders SET state = ?, hold_until = NULL, updated_at = ? "
                    "WHERE order_id = ?",
                    (CANCELLED, at, event.order_id),
                )
                db.execute(
                    "UPDATE outbox SET state = 'cancelled', last_error = ? WHERE order_id = ? "
                    "AND state IN ('pending', 'failed', 'held')",
                    (f"{event.kind.value} from OneTablet", event.order_id),
                )
            else:
                return True  # already so (or after dropoff): recorded, nobody told twice
            told = message(event.kind, event.order_id, at)
            topics = [DISPATCH_TOPIC] + ([courier_topic(courier)] if courier else [])
            db.executemany(
                "INSERT INTO notifications (topic, payload, created_at) VALUES (?, ?, ?)",
                [(topic, told, now) for topic in topics],
            )
        return True

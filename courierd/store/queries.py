"""Reads for people: `order show`, the operator commands' views, parked-push retries."""

from __future__ import annotations

from typing import Any

from courierd.domain.geo import eta
from courierd.domain.lifecycle import valid_state
from courierd.domain.model import CANCELLED, Place, iso
from courierd.errors import InputError
from courierd.store.db import Database
from courierd.store.schema import DELIVERED


class Queries:
    """Read models over one database connection."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def places(self, order_id: str) -> tuple[Place | None, Place | None]:
        """(pickup, dropoff) by CONTRACT.md 7's precedence: dispatch's assignment, then
        the store registry (pickup) or the order's delivery address (dropoff)."""
        row = self.db.row(
            "SELECT o.pickup_lat, o.pickup_lng, o.pickup_radius_m, s.lat, s.lng, s.radius_m, "
            "o.dropoff_lat, o.dropoff_lng, o.dropoff_radius_m, o.address_lat, o.address_lng "
            "FROM orders AS o LEFT JOIN stores AS s ON s.merchant_supplied_id = o.store_id "
            "WHERE o.order_id = ?",
            (order_id,),
        )
        if row is None:
            return None, None
        p = _place(*row[0:3]) or _place(*row[3:6])
        d = _place(*row[6:9]) or _place(row[9], row[10], None)
        return p, d

    def courier(self, courier_id: str | None) -> dict[str, Any] | None:
        """A courier's last accepted fix and liveness, or None if never heard of."""
        if courier_id is None:
            return None
        row = self.db.row(
            "SELECT fix_ts, lat, lng, accuracy_m, speed_mps, heading, last_seen, offline "
            "FROM couriers WHERE courier_id = ?",
            (courier_id,),
        )
        if row is None:
            return None
        ts, lat, lng, acc, speed, heading, last_seen, offline = row
        fix = None
        if ts is not None and lat is not None:
            fix = {"ts": ts, "lat": lat, "lng": lng, "accuracy_m": acc, "speed_mps": speed}
            fix["heading"] = heading
        return {
            "courier_id": courier_id,
            "fix": fix,
            "last_seen": None if last_seen is None else iso(last_seen),
            "offline": bool(offline),
        }

    def order_view(self, order_id: str) -> dict[str, Any] | None:
        """The JSON `courierd order show` prints (CONTRACT.md sections 1, 7 and 9)."""
        row = self.db.row(
            "SELECT state, courier_id, hold_until FROM orders WHERE order_id = ?", (order_id,)
        )
        if row is None:
            return None
        state, courier_id, hold_until = row
        transitions = [
            {
                "status": s,
                "at": at,
                "inferred": bool(inf),
                "source": source or ("fill" if inf else "app"),
                "event_id": eid,
                **({"lat": lat, "lng": lng} if lat is not None else {}),
            }
            for s, at, inf, eid, source, lat, lng in self.db.rows(
                "SELECT status, at, inferred, event_id, source, lat, lng FROM transitions "
                "WHERE order_id = ? ORDER BY id",
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
            for s, st, n, err, key in self.db.rows(
                "SELECT status, state, attempts, last_error, idempotency_key FROM outbox "
                "WHERE order_id = ? ORDER BY id",
                (order_id,),
            )
        ]
        courier = self.courier(courier_id)
        pickup, dropoff = self.places(order_id)
        fix = None if courier is None else courier["fix"]
        position = None if fix is None else Place(fix["lat"], fix["lng"])
        speed = None if fix is None else fix["speed_mps"]
        estimate = eta(state, position, pickup, dropoff, speed)
        return {
            "order_id": order_id,
            "state": state if valid_state(state) else f"corrupt: {state!r}",
            "courier_id": courier_id,
            "cancelled": state == CANCELLED,
            "cancelling": hold_until is not None,
            "transitions": transitions,
            "pushes": pushes,
            "courier_last_seen": None if courier is None else courier["last_seen"],
            "courier_offline": False if courier is None else courier["offline"],
            "eta": None if estimate is None else estimate.as_json(),
            "places": {"pickup": _place_json(pickup), "dropoff": _place_json(dropoff)},
        }

    def outbox_status(self, now: float) -> dict[str, Any]:
        pending, oldest = self.db.row(
            "SELECT count(*), min(created_at) FROM outbox WHERE state = 'pending'"
        ) or (0, None)
        return {
            "pending": int(pending),
            "oldest_pending_age_s": None if oldest is None else round(now - oldest, 3),
            "failed": int(self.db.value("SELECT count(*) FROM outbox WHERE state = 'failed'")),
            "held": int(self.db.value("SELECT count(*) FROM outbox WHERE state = 'held'")),
            "dead_letters": int(self.db.value("SELECT count(*) FROM dead_letters")),
        }

    def failed_pushes(self, limit: int) -> list[dict[str, Any]]:
        rows = self.db.rows(
            "SELECT order_id, status, attempts, last_error, created_at FROM outbox "
            "WHERE state = 'failed' ORDER BY id LIMIT ?",
            (limit,),
        )
        return [
            {"order_id": o, "status": s, "attempts": n, "last_error": e, "created_at": c}
            for o, s, n, e, c in rows
        ]

    def dead_letters(self, limit: int, reason: str | None) -> list[dict[str, Any]]:
        where, params = ("WHERE reason = ?", [reason]) if reason is not None else ("", [])
        rows = self.db.rows(
            "SELECT id, received_at, topic, reason, detail, payload, size FROM dead_letters "
            f"{where} ORDER BY id DESC LIMIT ?",
            (*params, limit),
        )
        return [
            {
                "id": i,
                "received_at": at,
                "topic": t,
                "reason": r,
                "detail": d,
                "payload": bytes(p[:200]).decode("utf-8", errors="replace"),
                "size": len(p) if size is None else size,
            }
            for i, at, t, r, d, p, size in rows
        ]

    def retry_failed(self, order_id: str | None, now: float) -> int:
        """Make parked pushes (of one order, or all) pending again, due now; how many."""
        where, params = ("AND order_id = ?", (order_id,)) if order_id is not None else ("", ())
        with self.db.transaction():
            changed = self.db.changed(
                f"UPDATE outbox SET state = 'pending', next_attempt_at = ? "
                f"WHERE state = 'failed' {where}",
                (now, *params),
            )
        if changed == 0:
            which = f"order {order_id!r} has" if order_id is not None else "there are"
            raise InputError(f"{which} no failed pushes to retry")
        return changed


def _place(lat: Any, lng: Any, radius: Any) -> Place | None:
    return None if lat is None or lng is None else Place(lat, lng, radius)


def _place_json(place: Place | None) -> dict[str, Any] | None:
    if place is None:
        return None
    return {"lat": place.lat, "lng": place.lng, "radius_m": place.radius_m}

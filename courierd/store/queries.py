"""Reads for people: `order show`, the operator commands' views, parked-push retries."""

from __future__ import annotations

from typing import Any

from courierd.domain.geo import eta
from courierd.domain.lifecycle import CHAIN, FINISHED, active_sql, valid_state
from courierd.domain.model import CANCELLED, EXPIRED, NEW, Place, iso
from courierd.errors import InputError
from courierd.store.db import Database, Row, chunks, placeholders
from courierd.store.schema import DELIVERED

# The ids through the partial index of failed pushes (a handful), then their rows: with
# `WHERE state = 'failed' ORDER BY id` alone, SQLite walks the whole outbox in id order.
FAILED_PUSHES_SQL = (
    "SELECT order_id, status, attempts, last_error, created_at FROM outbox WHERE id IN "
    "(SELECT id FROM outbox WHERE state = 'failed') ORDER BY id LIMIT ?"
)


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
            "SELECT state, courier_id, hold_until, confirmed_at, ready_at FROM orders "
            "WHERE order_id = ?",
            (order_id,),
        )
        if row is None:
            return None
        state, courier_id, hold_until, confirmed_at, ready_at = row
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
            "restaurant": {"confirmed_at": confirmed_at, "ready_at": ready_at},
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
        rows = self.db.rows(FAILED_PUSHES_SQL, (limit,))
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
                f"UPDATE outbox SET state = 'pending', next_attempt_at = {self.db.at_once} "
                f"WHERE state = 'failed' {where}",
                (now, *params),
            )
        if changed == 0:
            which = f"order {order_id!r} has" if order_id is not None else "there are"
            raise InputError(f"{which} no failed pushes to retry")
        return changed

    # -- The dispatch API and the operator page (README "Dispatch API") ---------------

    def order_page(
        self,
        *,
        state: str | None,
        courier_id: str | None,
        limit: int,
        after: tuple[str, str] | None,
    ) -> tuple[list[dict[str, Any]], tuple[str, str] | None]:
        """Orders, most recently updated first, and the (updated_at, order_id) of the last
        one when more follow. `state` may be "active" (not finished); `after` is the key
        the previous page ended on (keyset paging: stable while orders change)."""
        where: list[str] = []
        params: list[Any] = []
        if state == "active":
            where.append(active_sql())
        elif state is not None:
            where.append("state = ?")
            params.append(state)
        if courier_id is not None:
            where.append("courier_id = ?")
            params.append(courier_id)
        if after is not None:
            where.append("(updated_at < ? OR (updated_at = ? AND order_id < ?))")
            params += [after[0], after[0], after[1]]
        rows = self.db.rows(
            f"SELECT {_SUMMARY} FROM orders {'WHERE ' + ' AND '.join(where) if where else ''} "
            "ORDER BY updated_at DESC, order_id DESC LIMIT ?",
            (*params, limit + 1),
        )
        page = [_summary(row) for row in rows[:limit]]
        last = rows[limit - 1] if len(rows) > limit else None
        return page, None if last is None else (last[3], last[0])

    def couriers_overview(self, limit: int) -> list[dict[str, Any]]:
        """Couriers, most recently heard from first: last fix, liveness, active orders
        (the one furthest along the chain first) and the ETA of that first order."""
        rows = self.db.rows(
            "SELECT courier_id, fix_ts, lat, lng, accuracy_m, speed_mps, heading, last_seen, "
            "offline FROM couriers ORDER BY CASE WHEN last_seen IS NULL THEN 1 ELSE 0 END, "
            "last_seen DESC, courier_id LIMIT ?",
            (limit,),
        )
        active = self._active_orders([row[0] for row in rows])
        out = []
        for courier_id, *fix_row, last_seen, offline in rows:
            fix = _fix(*fix_row)
            orders = active.get(courier_id, [])
            estimate = None
            if orders and fix is not None:
                order_id, state = orders[0]
                pickup, dropoff = self.places(order_id)
                here = Place(fix["lat"], fix["lng"])
                found = eta(state, here, pickup, dropoff, fix["speed_mps"])
                estimate = None if found is None else {"order_id": order_id, **found.as_json()}
            out.append(
                {
                    "courier_id": courier_id,
                    "fix": fix,
                    "last_seen": None if last_seen is None else iso(last_seen),
                    "offline": bool(offline),
                    "active_order_ids": [order_id for order_id, _ in orders],
                    "eta": estimate,
                }
            )
        return out

    def _active_orders(self, courier_ids: list[str]) -> dict[str, list[tuple[str, str]]]:
        """courier id → its unfinished (order id, state), furthest along the chain first."""
        found: dict[str, list[tuple[str, str, str]]] = {}
        for chunk in chunks(courier_ids):
            for order_id, courier_id, state, updated_at in self.db.rows(
                "SELECT order_id, courier_id, state, updated_at FROM orders "
                f"WHERE courier_id IN ({placeholders(chunk)}) AND {active_sql()}",
                chunk,
            ):
                found.setdefault(courier_id, []).append((order_id, state, updated_at))
        return {
            courier_id: [
                (o, st)
                for o, st, _ in sorted(orders, key=lambda r: (-_RANKS.get(r[1], -2), r[2], r[0]))
            ]
            for courier_id, orders in found.items()
        }

    def dashboard(self, now: float, *, active_cap: int, dead_letters: int) -> dict[str, Any]:
        """What the operator page's front view shows (auth pause aside: not in the
        database): orders by state, the active ones, couriers offline, the outbox and
        the latest dead letters."""
        by_state = dict.fromkeys(_STATES, 0)
        for state, n in self.db.rows("SELECT state, count(*) FROM orders GROUP BY state"):
            by_state[str(state)] = int(n)
        active, more = self.order_page(
            state="active", courier_id=None, limit=active_cap, after=None
        )
        offline_rows = self.db.rows(
            "SELECT c.courier_id, c.last_seen FROM couriers AS c WHERE c.offline = 1 AND EXISTS "
            "(SELECT 1 FROM orders AS o WHERE o.courier_id = c.courier_id "
            f"AND {active_sql('o.state')}) ORDER BY c.last_seen, c.courier_id LIMIT ?",
            (active_cap,),
        )
        orders = self._active_orders([row[0] for row in offline_rows])
        return {
            "orders_by_state": by_state,
            "active_orders": active,
            "active_total": sum(n for s, n in by_state.items() if s not in _FINISHED),
            "active_truncated": more is not None,
            "couriers_offline": [
                {
                    "courier_id": courier_id,
                    "last_seen": None if last_seen is None else iso(last_seen),
                    "order_ids": [order_id for order_id, _ in orders.get(courier_id, [])],
                }
                for courier_id, last_seen in offline_rows
            ],
            "outbox": self.outbox_status(now),
            "dead_letters": self.dead_letters(dead_letters, None),
        }

    def order_track(
        self,
        order_id: str,
        *,
        pickup_radius_m: float,
        dropoff_radius_m: float,
        exit_factor: float,
        limit: int,
    ) -> dict[str, Any] | None:
        """What the page draws for one order: its courier's accepted fixes since the
        order began (its first transition, else its last change) until it finished,
        its places with radius and exit radius, and where each status fired."""
        row = self.db.row(
            "SELECT state, courier_id, updated_at FROM orders WHERE order_id = ?", (order_id,)
        )
        if row is None:
            return None
        state, courier_id, updated_at = row
        transitions = [
            {"status": s, "source": src or ("fill" if inf else "app"), "at": at, "lat": y, "lng": x}
            for s, src, inf, at, y, x in self.db.rows(
                "SELECT status, source, inferred, at, lat, lng FROM transitions "
                "WHERE order_id = ? ORDER BY id",
                (order_id,),
            )
        ]
        since = min((t["at"] for t in transitions), default=updated_at)
        until = None
        if state in (CANCELLED, EXPIRED):
            until = updated_at
        elif state in _FINISHED:
            until = max((t["at"] for t in transitions), default=updated_at)
        points: list[Row] = []
        if courier_id is not None:
            bound = "" if until is None else "AND ts <= ? "
            points = self.db.rows(
                "SELECT ts, lat, lng, accuracy_m FROM track_points WHERE courier_id = ? "
                f"AND ts >= ? {bound}ORDER BY ts DESC, id DESC LIMIT ?",
                (courier_id, since, *(() if until is None else (until,)), limit + 1),
            )
        pickup, dropoff = self.places(order_id)
        return {
            "order_id": order_id,
            "state": state,
            "courier_id": courier_id,
            "since": since,
            "until": until,
            "points": [
                {"ts": ts, "lat": y, "lng": x, "accuracy_m": acc}
                for ts, y, x, acc in reversed(points[:limit])
            ],
            "truncated": len(points) > limit,
            "pickup": _circle(pickup, pickup_radius_m, exit_factor),
            "dropoff": _circle(dropoff, dropoff_radius_m, exit_factor),
            "transitions": transitions,
        }


_STATES = (NEW, *(s.value for s in CHAIN), CANCELLED, EXPIRED)
_RANKS = {state: i for i, state in enumerate(_STATES[:-2])}
_FINISHED = FINISHED
_SUMMARY = "order_id, state, courier_id, updated_at, status_at, hold_until"


def _summary(row: Row) -> dict[str, Any]:
    order_id, state, courier_id, updated_at, status_at, hold_until = row
    return {
        "order_id": order_id,
        "state": state,
        "courier_id": courier_id,
        "updated_at": updated_at,
        "status_at": status_at,
        "cancelling": hold_until is not None,
    }


def _fix(*row: Any) -> dict[str, Any] | None:
    """A couriers row's last fix (ts, lat, lng, accuracy_m, speed_mps, heading), if any."""
    fix = dict(zip(("ts", "lat", "lng", "accuracy_m", "speed_mps", "heading"), row, strict=True))
    return None if None in (fix["ts"], fix["lat"], fix["lng"]) else fix


def _circle(place: Place | None, default_m: float, exit_factor: float) -> dict[str, Any] | None:
    if place is None:
        return None
    radius = default_m if place.radius_m is None else place.radius_m
    return {
        "lat": place.lat,
        "lng": place.lng,
        "radius_m": radius,
        "exit_radius_m": radius * exit_factor,
    }


def _place(lat: Any, lng: Any, radius: Any) -> Place | None:
    return None if lat is None or lng is None else Place(lat, lng, radius)


def _place_json(place: Place | None) -> dict[str, Any] | None:
    if place is None:
        return None
    return {"lat": place.lat, "lng": place.lng, "radius_m": place.radius_m}

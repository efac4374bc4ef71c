"""Reads for people: `order show`, the operator commands' views, parked-push retries."""

from __future__ import annotations

from typing import Any

from courierd.domain.lifecycle import valid_state
from courierd.domain.model import CANCELLED
from courierd.errors import InputError
from courierd.store.db import Database
from courierd.store.schema import DELIVERED


class Queries:
    """Read models over one database connection."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def order_view(self, order_id: str) -> dict[str, Any] | None:
        """The JSON `courierd order show` prints (CONTRACT.md section 1)."""
        row = self.db.row(
            "SELECT state, courier_id, hold_until FROM orders WHERE order_id = ?", (order_id,)
        )
        if row is None:
            return None
        state, courier_id, hold_until = row
        transitions = [
            {"status": s, "at": at, "inferred": bool(inf), "event_id": eid}
            for s, at, inf, eid in self.db.rows(
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
            for s, st, n, err, key in self.db.rows(
                "SELECT status, state, attempts, last_error, idempotency_key FROM outbox "
                "WHERE order_id = ? ORDER BY id",
                (order_id,),
            )
        ]
        return {
            "order_id": order_id,
            "state": state if valid_state(state) else f"corrupt: {state!r}",
            "courier_id": courier_id,
            "cancelled": state == CANCELLED,
            "cancelling": hold_until is not None,
            "transitions": transitions,
            "pushes": pushes,
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

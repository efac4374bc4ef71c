"""OneTablet → courierd events (CONTRACT.md 11): the restaurant confirmed, rejected or has
the order ready, or OneTablet cancelled it. Parsing and meaning, pure.

A body is OneTablet's webhook envelope `{"event": {"type", "order_id", "id"?}, ...}` or
the flat `{"type", "order_id"}`. A rejection or a cancellation cancels the order locally
(terminal, as `order cancel`, but without calling OneTablet back; refused after dropoff,
which is then only recorded); a confirmation or "ready" is recorded. Each is told to the
order's courier (`couriers/{id}/orders`) and to dispatch (`dispatch/events`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from courierd.domain import fields
from courierd.domain.lifecycle import FINISHED
from courierd.domain.model import dumps
from courierd.errors import TelemetryError

DISPATCH_TOPIC = "dispatch/events"


class Kind(enum.StrEnum):
    CONFIRMED = "order.confirmed"
    REJECTED = "order.rejected"
    READY = "order.ready"
    CANCELLED = "order.cancelled"


# What couriers and dispatch are told (a rejection is a cancellation to them).
TOLD = {
    Kind.CONFIRMED: "order_confirmed",
    Kind.READY: "order_ready",
    Kind.REJECTED: "order_cancelled",
    Kind.CANCELLED: "order_cancelled",
}


@dataclass(frozen=True, slots=True)
class RestaurantEvent:
    kind: Kind
    order_id: str
    event_id: str | None  # OneTablet's `event.id`: the same one twice has no second effect


def parse_event(body: bytes) -> RestaurantEvent:
    """The event in a request body, or TelemetryError naming what is wrong."""
    doc = fields.load_object(body)
    event = doc.get("event")
    if event is not None:
        if not isinstance(event, dict):
            raise TelemetryError("wrong_type", "event must be an object")
        doc = event
    kind_text = fields.required_string(doc, "type", limit=64)
    try:
        kind = Kind(kind_text)
    except ValueError:
        known = ", ".join(k.value for k in Kind)
        raise TelemetryError(
            "unknown_type", f"type {kind_text[:40]!r} is not one of {known}"
        ) from None
    event_id = fields.string(doc, "id", limit=fields.MAX_ID) if event is not None else None
    return RestaurantEvent(kind, fields.order_id(doc), event_id)


def cancels(kind: Kind, state: str) -> bool:
    """Whether the event makes the order cancelled now: not once it is finished (dropped
    off, cancelled already, or expired: an expired order stays expired)."""
    return kind in (Kind.REJECTED, Kind.CANCELLED) and state not in FINISHED


def message(kind: Kind, order_id: str, at: str) -> str:
    """What courierd publishes for it."""
    payload: dict[str, Any] = {"type": TOLD[kind], "order_id": order_id, "at": at}
    return dumps(payload)


def courier_topic(courier_id: str) -> str:
    return f"couriers/{courier_id}/orders"

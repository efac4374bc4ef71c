"""MQTT topic + payload bytes → an input value, or a dead letter with a stable reason.

Validation is written out by hand rather than with pydantic: every message of the
daemon's hot path passes here, the rules are few, and each failure needs a precise,
stable reason code (for metrics) and a readable detail (for operators). `parse` never
raises: whatever the bytes, the result is a value or a DeadLetter (CONTRACT.md 4.14).
"""

from __future__ import annotations

import logging
from typing import Any

from courierd.domain import fields
from courierd.domain.model import (
    Assignment,
    CourierOffline,
    DeadLetter,
    Ignored,
    Input,
    LocationFix,
    Place,
    ProfileUpdate,
    Status,
    StatusEvent,
)
from courierd.domain.owntracks import CourierIdFrom, parse_owntracks
from courierd.errors import TelemetryError

log = logging.getLogger(__name__)

MAX_PAYLOAD = 64 * 1024
# A fix stamped further ahead than this comes from a phone with a wrong clock: taken
# as is, it would pin the courier's position (an older fix never replaces a newer one).
FUTURE_SLACK_S = 300.0
ASSIGNMENTS_TOPIC = "dispatch/assignments"
# All of couriers/#, not only the known kinds: a courier app publishing to a wrong
# topic then shows up as an `unknown_topic` dead letter instead of vanishing.
SUBSCRIPTIONS = ("couriers/#", ASSIGNMENTS_TOPIC)
# courierd's own topics under couriers/ (order events for the courier): not input.
OUTPUT_KINDS = frozenset({"orders"})
_STATUSES = {s.value: s for s in Status}
_VEHICLE_FIELDS = ("color", "make", "model")


def parse(
    topic: str,
    payload: bytes,
    *,
    now: float,
    size: int | None = None,
    owntracks: CourierIdFrom | None = "user",
) -> Input:
    """Turn one message into an input; anything unusable becomes a DeadLetter.

    `now` (unix time) bounds how far in the future a fix may be; `size` is the
    original payload size when the edge kept only the start of an oversized payload;
    `owntracks` says where an OwnTracks courier id comes from (None: OwnTracks is off).
    """
    try:
        if topic.startswith("owntracks/"):
            if owntracks is None:
                return Ignored("owntracks_disabled")
            if (len(payload) if size is None else size) > MAX_PAYLOAD:
                raise TelemetryError("too_large", "OwnTracks payload exceeds 64 KiB")
            return parse_owntracks(
                topic,
                payload,
                now=now,
                courier_id_from=owntracks,
                future_slack_s=FUTURE_SLACK_S,
            )
        return _parse(topic, payload, now, len(payload) if size is None else size)
    except TelemetryError as e:
        return DeadLetter(topic, payload, e.reason, e.detail, size)
    except Exception as e:  # a bug here must cost one message, never the daemon
        log.exception("telemetry.parse_failed topic=%s", topic)
        return DeadLetter(topic, payload, "unprocessable", f"{type(e).__name__}: {e}", size)


def _parse(topic: str, payload: bytes, now: float, size: int) -> Input:
    if size > MAX_PAYLOAD:
        raise TelemetryError("too_large", f"payload of {size} bytes exceeds 64 KiB")
    if topic == ASSIGNMENTS_TOPIC:
        doc = fields.load_object(payload)
        courier_id = fields.required_id(doc, "courier_id", fields.MAX_ID)
        if any(c in courier_id for c in "/+#"):
            raise TelemetryError("wrong_type", "courier_id must be one topic level (no / + #)")
        pickup, dropoff = place(doc, "pickup"), place(doc, "dropoff")
        when = fields.timestamp(doc, required=False)
        # Stamped far ahead, an assignment would pin the order: nothing could replace it.
        ts = None if when is None else fields.not_in_future(when, now, FUTURE_SLACK_S)
        return Assignment(fields.order_id(doc), courier_id, payload, pickup, dropoff, ts)
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != "couriers" or not parts[1]:
        raise TelemetryError("unknown_topic", f"topic {topic[:200]!r} is not one courierd reads")
    courier_id, kind = fields.check_id(parts[1], "courier id", fields.MAX_ID), parts[2]
    if kind == "status":
        return _status_event(courier_id, fields.load_object(payload), payload)
    if kind == "location":
        return _location(courier_id, fields.load_object(payload), now)
    if kind == "profile":
        # An empty retained message clears the profile (that is how MQTT deletes one).
        if not payload:
            return ProfileUpdate(courier_id, None)
        return ProfileUpdate(courier_id, courier_info(fields.load_object(payload), "profile"))
    if kind == "lwt":  # the app's MQTT last will: whatever the payload, it is gone
        return CourierOffline(courier_id)
    if kind in OUTPUT_KINDS:  # what courierd itself publishes to the courier
        return Ignored("courierd_output")
    raise TelemetryError("unknown_topic", f"topic {topic[:200]!r} is not one courierd reads")


def _status_event(courier_id: str, doc: dict[str, Any], raw: bytes) -> StatusEvent:
    event_id = fields.required_id(doc, "event_id")
    order_id = fields.order_id(doc)
    status_text = fields.required_string(doc, "status")
    status = _STATUSES.get(status_text)
    if status is None:
        raise TelemetryError("unknown_status", f"status {status_text[:40]!r} is not in the chain")
    stamp = fields.stored_timestamp(doc, required=False)
    ts = None if stamp is None else stamp[1]
    info = courier_info(doc["courier_info"], "courier_info") if "courier_info" in doc else None
    return StatusEvent(event_id, order_id, courier_id, status, ts, info, raw)


def _location(courier_id: str, doc: dict[str, Any], now: float) -> LocationFix:
    stamp = fields.stored_timestamp(doc, required=True)
    assert stamp is not None
    lat, lng = fields.position(doc, "lat", "lng")
    return LocationFix(
        courier_id,
        fields.not_in_future(stamp[0], now, FUTURE_SLACK_S, stored=stamp[1]),
        lat,
        lng,
        fields.number(doc, "accuracy_m", low=0),
        fields.number(doc, "speed_mps", low=0),
        fields.number(doc, "heading", low=-360, high=360),
    )


def place(doc: dict[str, Any], key: str) -> Place | None:
    """An optional place `{"lat", "lng", "radius_m"?}` (CONTRACT.md 7)."""
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TelemetryError("wrong_type", f"{key} must be an object with lat and lng")
    lat, lng = fields.position(value, "lat", "lng", where=key)
    radius = fields.number(value, "radius_m", low=1, high=100_000, where=key)
    return Place(lat, lng, radius)


def courier_info(value: Any, where: str) -> dict[str, Any]:
    """courier_info: full_name, phone, vehicle{color, make, model}; all optional strings."""
    if not isinstance(value, dict):
        raise TelemetryError("wrong_type", f"{where} must be an object")
    info: dict[str, Any] = {}
    for key in ("full_name", "phone"):
        text = fields.string(value, key, where=where)
        if text is not None:
            info[key] = text
    vehicle = value.get("vehicle")
    if vehicle is not None:
        if not isinstance(vehicle, dict):
            raise TelemetryError("wrong_type", f"{where}.vehicle must be an object")
        found = {k: fields.string(vehicle, k, where=f"{where}.vehicle") for k in _VEHICLE_FIELDS}
        info["vehicle"] = {k: v for k, v in found.items() if v is not None}
    return info

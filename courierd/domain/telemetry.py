"""MQTT topic + payload bytes → an input value, or a dead letter with a stable reason.

Validation is written out by hand rather than with pydantic: every message of the
daemon's hot path passes here, the rules are few, and each failure needs a precise,
stable reason code (for metrics) and a readable detail (for operators).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from courierd.domain.model import (
    Assignment,
    DeadLetter,
    Input,
    LocationFix,
    ProfileUpdate,
    Status,
    StatusEvent,
    format_ts,
)
from courierd.errors import TelemetryError

MAX_PAYLOAD = 64 * 1024
MAX_ID = 128
ASSIGNMENTS_TOPIC = "dispatch/assignments"
# All of couriers/#, not only the three known kinds: a courier app publishing to a
# wrong topic then shows up as an `unknown_topic` dead letter instead of vanishing.
SUBSCRIPTIONS = ("couriers/#", ASSIGNMENTS_TOPIC)
_STATUSES = {s.value: s for s in Status}
_VEHICLE_FIELDS = ("color", "make", "model")


def parse(topic: str, payload: bytes) -> Input:
    """Turn one message into an input; anything unusable becomes a DeadLetter."""
    try:
        return _parse(topic, payload)
    except TelemetryError as e:
        return DeadLetter(topic, payload, e.reason, e.detail)


def _parse(topic: str, payload: bytes) -> Input:
    if len(payload) > MAX_PAYLOAD:
        raise TelemetryError("too_large", f"payload of {len(payload)} bytes exceeds 64 KiB")
    if topic == ASSIGNMENTS_TOPIC:
        doc = _object(payload)
        return Assignment(_order_id(doc), _required(doc, "courier_id"))
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != "couriers" or not parts[1]:
        raise TelemetryError("unknown_topic", f"topic {topic!r} is not one courierd reads")
    courier_id, kind = parts[1], parts[2]
    if kind == "status":
        return _status_event(courier_id, _object(payload), payload)
    if kind == "location":
        return _location(courier_id, _object(payload))
    if kind == "profile":
        # An empty retained message clears the profile (that is how MQTT deletes one).
        if not payload:
            return ProfileUpdate(courier_id, None)
        return ProfileUpdate(courier_id, _courier_info(_object(payload), "profile"))
    raise TelemetryError("unknown_topic", f"topic {topic!r} is not one courierd reads")


def _object(payload: bytes) -> dict[str, Any]:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TelemetryError("bad_utf8", f"payload is not UTF-8 ({e.reason} at {e.start})") from e
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise TelemetryError("bad_json", f"payload is not JSON ({e.msg} at {e.pos})") from e
    if not isinstance(doc, dict):
        raise TelemetryError("not_object", f"payload is a JSON {type(doc).__name__}, not an object")
    return doc


def _status_event(courier_id: str, doc: dict[str, Any], raw: bytes) -> StatusEvent:
    event_id = _required(doc, "event_id")
    order_id = _order_id(doc)
    status_text = _required(doc, "status")
    status = _STATUSES.get(status_text)
    if status is None:
        raise TelemetryError("unknown_status", f"status {status_text!r} is not in the chain")
    ts = _timestamp(doc, required=False)
    info = _courier_info(doc["courier_info"], "courier_info") if "courier_info" in doc else None
    return StatusEvent(event_id, order_id, courier_id, status, ts, info, raw)


def _location(courier_id: str, doc: dict[str, Any]) -> LocationFix:
    ts = _timestamp(doc, required=True)
    assert ts is not None
    lat, lng = _number(doc, "lat", required=True), _number(doc, "lng", required=True)
    assert lat is not None and lng is not None
    if not (-90 <= lat <= 90 and -180 <= lng <= 180):
        raise TelemetryError("wrong_type", f"lat/lng {lat},{lng} is not a position on Earth")
    return LocationFix(
        courier_id,
        ts,
        lat,
        lng,
        _number(doc, "accuracy_m"),
        _number(doc, "speed_mps"),
        _number(doc, "heading"),
    )


def _courier_info(value: Any, where: str) -> dict[str, Any]:
    """courier_info: full_name, phone, vehicle{color, make, model}; all optional strings."""
    if not isinstance(value, dict):
        raise TelemetryError("wrong_type", f"{where} must be an object")
    info: dict[str, Any] = {}
    for key in ("full_name", "phone"):
        text = _string(value, key, where=where)
        if text is not None:
            info[key] = text
    vehicle = value.get("vehicle")
    if vehicle is not None:
        if not isinstance(vehicle, dict):
            raise TelemetryError("wrong_type", f"{where}.vehicle must be an object")
        fields = {k: _string(vehicle, k, where=f"{where}.vehicle") for k in _VEHICLE_FIELDS}
        info["vehicle"] = {k: v for k, v in fields.items() if v is not None}
    return info


def _order_id(doc: Mapping[str, Any]) -> str:
    order_id = _required(doc, "order_id")
    if not order_id or len(order_id) > MAX_ID or "/" in order_id:
        raise TelemetryError(
            "bad_order_id", f"order_id {order_id[:40]!r} must be 1-128 characters without '/'"
        )
    return order_id


def _required(doc: Mapping[str, Any], key: str) -> str:
    value = _string(doc, key, required=True)
    assert value is not None
    return value


def _string(
    doc: Mapping[str, Any], key: str, *, required: bool = False, where: str = ""
) -> str | None:
    name = f"{where}.{key}" if where else key
    if key not in doc or doc[key] is None:
        if required:
            raise TelemetryError("missing_field", f"{name} is required")
        return None
    value = doc[key]
    if not isinstance(value, str):
        raise TelemetryError("wrong_type", f"{name} must be a string")
    if required and not value and key != "order_id":
        raise TelemetryError("missing_field", f"{name} is empty")
    return value


def _number(doc: Mapping[str, Any], key: str, *, required: bool = False) -> float | None:
    value = doc.get(key)
    if value is None:
        if required:
            raise TelemetryError("missing_field", f"{key} is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TelemetryError("wrong_type", f"{key} must be a number")
    return float(value)


def _timestamp(doc: Mapping[str, Any], *, required: bool) -> str | None:
    """RFC 3339 with an offset, normalised to UTC so stored values sort as text."""
    text = _string(doc, "ts", required=required)
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError as e:
        raise TelemetryError("bad_ts", f"ts {text[:40]!r} is not RFC 3339") from e
    if when.tzinfo is None or "T" not in text.upper():
        raise TelemetryError("bad_ts", f"ts {text[:40]!r} needs a date, a time and an offset")
    return format_ts(when)

"""OwnTracks phones as couriers (CONTRACT.md section 8): their JSON → courierd's inputs.

OwnTracks publishes `_type: location` to `owntracks/{user}/{device}`, its MQTT last will
`{"_type": "lwt"}` to the same topic, and region events to `…/event` (booklet,
docs/tech/json.md). A location becomes a LocationFix: `lon` → lng, `acc` → accuracy,
`tst` (epoch seconds) → ts, `vel` (km/h) → m/s, `cog` → heading; the app leaves out
fields that are zero. A last will marks the courier offline. Every other `_type`
(transition, waypoint(s), status, card, cmd, steps, beacon, encrypted, ...) is valid
OwnTracks that courierd has no use for: counted and ignored, not a dead letter. A
payload that is not valid OwnTracks JSON (no `_type`, a location without position or
time) is a dead letter like any other.
"""

from __future__ import annotations

from typing import Any, Literal

from courierd.domain import fields
from courierd.domain.model import CourierOffline, Ignored, Input, LocationFix
from courierd.errors import TelemetryError

CourierIdFrom = Literal["user", "device", "tid"]
PREFIX = "owntracks/"
SUBSCRIPTIONS = ("owntracks/+/+", "owntracks/+/+/event")
KMH = 3.6  # km/h per m/s


def parse_owntracks(
    topic: str, payload: bytes, *, now: float, courier_id_from: CourierIdFrom, future_slack_s: float
) -> Input:
    """One OwnTracks message; raises TelemetryError for what is not valid OwnTracks."""
    parts = topic.split("/")
    if len(parts) not in (3, 4) or not parts[1] or not parts[2]:
        raise TelemetryError("unknown_topic", f"topic {topic[:200]!r} is not an OwnTracks topic")
    if len(parts) == 4 and parts[3] != "event":
        raise TelemetryError("unknown_topic", f"topic {topic[:200]!r} is not one courierd reads")
    user, device = parts[1], parts[2]
    if not payload:  # a retained message being cleared
        return Ignored("owntracks_cleared")
    doc = fields.load_object(payload)
    kind = doc.get("_type")
    if not isinstance(kind, str) or not kind:
        raise TelemetryError("missing_field", "_type is required in OwnTracks JSON")
    if kind == "location":
        return _location(doc, _courier(doc, user, device, courier_id_from), now, future_slack_s)
    if kind == "lwt":
        return CourierOffline(_courier(doc, user, device, courier_id_from))
    return Ignored(f"owntracks_{fields.check_text(kind, '_type', 32)}")


def _courier(doc: dict[str, Any], user: str, device: str, source: CourierIdFrom) -> str:
    """The courier id: the topic's user or device level, or the payload's `tid`, which
    the app defaults to the device name's last two characters."""
    if source == "user":
        value = user
    elif source == "device":
        value = device
    else:
        value = fields.string(doc, "tid", limit=fields.MAX_ID) or device[-2:]
    return fields.check_id(value, "courier id", fields.MAX_ID)


def _location(doc: dict[str, Any], courier_id: str, now: float, slack_s: float) -> LocationFix:
    lat, lng = fields.position(doc, "lat", "lon")
    tst = fields.number(doc, "tst", required=True, low=0)
    assert tst is not None
    when = fields.epoch_seconds(tst, "tst")
    vel = fields.number(doc, "vel", low=0)
    return LocationFix(
        courier_id,
        fields.not_in_future(when, now, slack_s, "tst"),
        lat,
        lng,
        fields.number(doc, "acc", low=0),
        None if vel is None else vel / KMH,
        fields.number(doc, "cog", low=-360, high=360),
    )

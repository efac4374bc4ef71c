"""Parsing MQTT input: good payloads become values, every bad kind a dead letter reason."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from courierd.domain.model import (
    Assignment,
    DeadLetter,
    LocationFix,
    ProfileUpdate,
    Status,
    StatusEvent,
)
from courierd.domain.telemetry import parse

NOW = 1_705_341_900.0  # 2024-01-15T18:05:00Z
GOOD = {
    "event_id": "3f0c7f0e",
    "order_id": "your-order-uuid",
    "status": "arrived_at_store",
    "ts": "2024-01-15T18:05:00Z",
    "courier_info": {
        "full_name": "Mike Driver",
        "phone": "+15559876543",
        "vehicle": {"color": "Blue", "make": "Toyota", "model": "Camry"},
    },
    "location": {"lat": 40.7128, "lng": -74.006},
}


def status(doc: object, topic: str = "couriers/c7/status") -> object:
    return parse(topic, json.dumps(doc).encode(), now=NOW)


def test_contract_example_status_event_parses() -> None:
    """The CONTRACT.md example becomes a StatusEvent; courier_id comes from the topic."""
    e = status({**GOOD, "courier_id": "spoofed", "extra": 1})
    assert isinstance(e, StatusEvent)
    assert (e.event_id, e.order_id, e.courier_id, e.status) == (
        "3f0c7f0e",
        "your-order-uuid",
        "c7",
        Status.ARRIVED_AT_STORE,
    )
    assert e.ts == "2024-01-15T18:05:00.000Z"
    assert e.courier_info == GOOD["courier_info"]


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("couriers/c7/status", b"x" * (64 * 1024 + 1), "too_large"),
        ("couriers/c7/status", b"\xff\xfe{}", "bad_utf8"),
        ("couriers/c7/status", b"{not json", "bad_json"),
        ("couriers/c7/status", b"[1, 2]", "not_object"),
        ("couriers/c7/status", b'"text"', "not_object"),
        ("couriers/c7/status", json.dumps({**GOOD, "event_id": None}).encode(), "missing_field"),
        (
            "couriers/c7/status",
            json.dumps({"order_id": "o", "status": "dropoff"}).encode(),
            "missing_field",
        ),
        ("couriers/c7/status", json.dumps({**GOOD, "event_id": 5}).encode(), "wrong_type"),
        ("couriers/c7/status", json.dumps({**GOOD, "courier_info": "Mike"}).encode(), "wrong_type"),
        (
            "couriers/c7/status",
            json.dumps({**GOOD, "courier_info": {"phone": 5}}).encode(),
            "wrong_type",
        ),
        (
            "couriers/c7/status",
            json.dumps({**GOOD, "status": "delivered"}).encode(),
            "unknown_status",
        ),
        ("couriers/c7/status", json.dumps({**GOOD, "ts": "yesterday"}).encode(), "bad_ts"),
        (
            "couriers/c7/status",
            json.dumps({**GOOD, "ts": "2024-01-15T18:05:00"}).encode(),
            "bad_ts",
        ),
        ("couriers/c7/status", json.dumps({**GOOD, "order_id": ""}).encode(), "bad_order_id"),
        ("couriers/c7/status", json.dumps({**GOOD, "order_id": "a/b"}).encode(), "bad_order_id"),
        (
            "couriers/c7/status",
            json.dumps({**GOOD, "order_id": "x" * 129}).encode(),
            "bad_order_id",
        ),
        ("couriers/c7/gossip", b"{}", "unknown_topic"),
        ("elsewhere", b"{}", "unknown_topic"),
        (
            "couriers/c7/location",
            b'{"ts": "2024-01-15T18:05:00Z", "lat": 91, "lng": 0}',
            "out_of_range",
        ),
        (
            "couriers/c7/location",
            b'{"ts": "2024-01-15T18:05:00Z", "lat": "1", "lng": 0}',
            "wrong_type",
        ),
        ("couriers/c7/location", b'{"lat": 1, "lng": 0}', "missing_field"),
        ("dispatch/assignments", b'{"order_id": "o1"}', "missing_field"),
        ("couriers/c7/profile", b'{"full_name": ["x"]}', "wrong_type"),
    ],
)
def test_bad_input_becomes_dead_letter_with_reason(topic: str, payload: bytes, reason: str) -> None:
    """Each kind of bad message is a dead letter with its stable reason and the raw bytes."""
    result = parse(topic, payload, now=NOW)
    assert isinstance(result, DeadLetter)
    assert (result.reason, result.topic, result.payload) == (reason, topic, payload)
    assert result.detail


def test_order_id_of_128_characters_is_fine() -> None:
    """The limit is inclusive: 128 characters is a valid order id."""
    assert isinstance(status({**GOOD, "order_id": "x" * 128}), StatusEvent)


def test_location_profile_assignment_parse() -> None:
    """Pings, retained profiles (and their clearing) and assignments become values."""
    fix = parse(
        "couriers/c7/location",
        b'{"ts": "2024-01-15T19:05:00+01:00", "lat": 40.7, "lng": -74, "heading": 90}',
        now=NOW,
    )
    assert fix == LocationFix("c7", "2024-01-15T18:05:00.000Z", 40.7, -74.0, heading=90.0)
    assert parse("couriers/c7/profile", b'{"full_name": "Mike", "x": 1}', now=NOW) == ProfileUpdate(
        "c7", {"full_name": "Mike"}
    )
    assert parse("couriers/c7/profile", b"", now=NOW) == ProfileUpdate("c7", None)
    assert parse(
        "dispatch/assignments", b'{"order_id": "o1", "courier_id": "c9"}', now=NOW
    ) == Assignment("o1", "c9")


@given(
    st.binary(max_size=300),
    st.sampled_from(
        ["couriers/c/status", "couriers/c/location", "couriers/c/profile", "dispatch/assignments"]
    ),
)
def test_parse_never_raises(payload: bytes, topic: str) -> None:
    """Arbitrary bytes never raise out of parse: they are a value or a dead letter."""
    parse(topic, payload, now=NOW)

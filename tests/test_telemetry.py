"""Parsing MQTT input: good payloads become values, every bad kind a dead letter reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from courierd.domain import fields
from courierd.domain.model import (
    Assignment,
    DeadLetter,
    LocationFix,
    ProfileUpdate,
    Status,
    StatusEvent,
    format_ts,
)
from courierd.domain.telemetry import parse
from courierd.errors import TelemetryError

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


@pytest.mark.parametrize(
    ("ts", "stored"),
    [
        ("2024-01-15T18:05:00Z", "2024-01-15T18:05:00.000Z"),
        ("2024-01-15t18:05:00z", "2024-01-15T18:05:00.000Z"),
        ("2024-01-15 18:05:00Z", "2024-01-15T18:05:00.000Z"),
        ("2024-01-15T19:35:00.123456789+01:30", "2024-01-15T18:05:00.123Z"),
        ("2016-12-31T23:59:60Z", "2016-12-31T23:59:59.999Z"),  # a leap second
        ("2016-12-31t23:59:60.5-01:00", "2017-01-01T00:59:59.999Z"),
    ],
)
def test_rfc3339_timestamps_accepted(ts: str, stored: str) -> None:
    """RFC 3339 as written: T, t or a space; Z, z or ±HH:MM; any fraction; leap seconds."""
    e = status({**GOOD, "ts": ts})
    assert isinstance(e, StatusEvent) and e.ts == stored


@given(
    instant=st.datetimes(
        min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
    ),
    offset_min=st.integers(-(24 * 60 - 1), 24 * 60 - 1),
    separator=st.sampled_from("Tt "),
    utc_letter=st.sampled_from("Zz"),
    digits=st.integers(0, 9),
)
def test_any_rfc3339_rendering_is_stored_as_its_instant(
    instant: datetime, offset_min: int, separator: str, utc_letter: str, digits: int
) -> None:
    """Whatever offset, separator and fraction an app writes, the same instant is stored
    (to the millisecond, truncated)."""
    local = instant.astimezone(timezone(timedelta(minutes=offset_min)))
    written = f"{local.microsecond:06d}000"[:digits]  # fewer digits, or more, than Python's
    if offset_min == 0:
        zone = utc_letter
    else:
        sign, minutes = ("+" if offset_min > 0 else "-"), abs(offset_min)
        zone = f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"
    ts = (
        f"{local.year:04d}-{local.month:02d}-{local.day:02d}{separator}"
        f"{local.hour:02d}:{local.minute:02d}:{local.second:02d}"
        + (f".{written}" if written else "")
        + zone
    )
    millis = int(written[:3].ljust(3, "0"))
    expected = instant.replace(microsecond=millis * 1000).isoformat(timespec="milliseconds")
    e = status({**GOOD, "ts": ts})
    assert isinstance(e, StatusEvent), (ts, e)
    assert e.ts == expected.replace("+00:00", "Z")


@pytest.mark.parametrize(
    "ts",
    [
        "2024-W03-1T18:05:00Z",  # ISO week date
        "2024-01-15T18:05:00+0530",  # offset without a colon
        "2024-01-15T18:05Z",  # no seconds
        "20240115T180500Z",  # basic format
        "2024-02-30T00:00:00Z",  # no such day
        "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
        "9999-12-31T23:59:59-01:00",  # after year 9999 in UTC
        "2024-01-15T18:05:00+24:00",
        "2024-01-15T18:05:00+05:75",  # no such minute of an offset
        "2024-01-15T24:00:00Z",  # no hour 24 (Python 3.14's fromisoformat takes it)
        "\uff12\uff10\uff12\uff14-01-15T18:05:00Z",  # non-ASCII digits
    ],
)
def test_not_rfc3339_is_bad_ts(ts: str) -> None:
    """Anything else Python's fromisoformat would take, or that overflows, is bad_ts."""
    result = status({**GOOD, "ts": ts})
    assert isinstance(result, DeadLetter) and result.reason == "bad_ts", result


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (rb'{"event_id": "\\ud800", "order_id": "o", "status": "dropoff"}', None),
        (rb'{"event_id": "\ud800", "order_id": "o", "status": "dropoff"}', "bad_unicode"),
        (rb'{"event_id": "e", "order_id": "\udfff", "status": "dropoff"}', "bad_unicode"),
        (rb'{"event_id": "e\u0000", "order_id": "o", "status": "dropoff"}', "bad_id"),
        (b'{"event_id": "e", "order_id": "o", "status": "dropoff", "x": NaN}', "bad_json"),
        (b'{"event_id": "e", "order_id": "o", "status": "dropoff", "x": 1e999}', "bad_json"),
        (
            b'{"event_id": "e", "order_id": "o", "status": "dropoff", "x": ' + b"9" * 5000 + b"}",
            "bad_json",
        ),
        (
            b'{"event_id": "e", "order_id": "o", "status": "dropoff", "x": '
            + b"[" * 3000
            + b"]" * 3000
            + b"}",
            "bad_json",
        ),
        (b'{"event_id": "' + b"e" * 300 + b'", "order_id": "o", "status": "dropoff"}', "too_long"),
    ],
)
def test_strings_and_numbers_that_would_explode_later(payload: bytes, reason: str | None) -> None:
    """Lone surrogates, NUL, NaN, infinities, 5,000-digit integers, deep nesting and
    overlong fields are dead letters with a reason, not exceptions in the database."""
    result = parse("couriers/c7/status", payload, now=NOW)
    if reason is None:
        assert isinstance(result, StatusEvent)  # an escaped backslash is just text
    else:
        assert isinstance(result, DeadLetter) and result.reason == reason, result


def test_location_from_the_future_is_refused() -> None:
    """A fix more than 5 minutes ahead of the clock would pin the courier: future_ts."""
    ahead = b'{"ts": "2024-01-15T18:11:00Z", "lat": 1, "lng": 2}'
    result = parse("couriers/c7/location", ahead, now=NOW)
    assert isinstance(result, DeadLetter) and result.reason == "future_ts"
    near = b'{"ts": "2024-01-15T18:09:00Z", "lat": 1, "lng": 2}'
    assert isinstance(parse("couriers/c7/location", near, now=NOW), LocationFix)


@pytest.mark.parametrize(
    "fix",
    [
        b'{"ts": "2024-01-15T18:05:00Z", "lat": 0, "lng": 180.5}',
        b'{"ts": "2024-01-15T18:05:00Z", "lat": -90.1, "lng": 0}',
        b'{"ts": "2024-01-15T18:05:00Z", "lat": 0, "lng": 0, "accuracy_m": -1}',
    ],
)
def test_positions_off_earth_are_out_of_range(fix: bytes) -> None:
    """lat within ±90, lng within ±180, accuracy not negative."""
    result = parse("couriers/c7/location", fix, now=NOW)
    assert isinstance(result, DeadLetter) and result.reason == "out_of_range"


def test_oversized_payload_known_only_by_its_size() -> None:
    """The MQTT edge forwards only the start of a huge payload; its size still decides."""
    result = parse("couriers/c7/status", b'{"event_id"', now=NOW, size=70_000)
    assert isinstance(result, DeadLetter) and result.reason == "too_large"
    assert result.size == 70_000


_TS_PARTS = st.tuples(
    st.sampled_from(["0000", "0001", "1970", "2024", "2026", "9999"]),
    st.sampled_from(["00", "01", "02", "12", "13"]),
    st.sampled_from(["00", "01", "28", "29", "30", "31"]),
    st.sampled_from("Tt "),
    st.sampled_from(["00", "12", "23", "24"]),
    st.sampled_from(["00", "59", "60"]),
    st.sampled_from(["00", "59", "60", "61"]),
    st.sampled_from(["", ".", ".1", ".12", ".123", ".1234", ".123456", ".1234567"]),
    st.sampled_from(["Z", "z", "+00:00", "-00:00", "+05:30", "-23:59", "+24:00", "+01:60"]),
)


@given(_TS_PARTS)
def test_a_ts_is_stored_as_the_one_format_whatever_path_it_takes(parts: tuple[str, ...]) -> None:
    """A UTC ts is written into the stored format from its digits, any other through
    the datetime: the same text (or the same refusal) either way."""
    y, mo, d, sep, h, mi, s, frac, off = parts
    text = f"{y}-{mo}-{d}{sep}{h}:{mi}:{s}{frac}{off}"
    try:
        expected: object = format_ts(fields.parse_rfc3339(text))
    except TelemetryError as e:
        expected = e.reason
    try:
        when, stored = fields.stored_rfc3339(text)
    except TelemetryError as e:
        assert e.reason == expected
        return
    assert stored == expected and when == fields.parse_rfc3339(text)
    status = json.dumps({"event_id": "e", "order_id": "o", "status": "dropoff", "ts": text})
    assert parse("couriers/c1/status", status.encode(), now=NOW).ts == stored  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        (b'{"a": 1}\n', None),  # a trailing newline, as many publishers send
        (b'{"a": 1} \r\n\t', None),
        (b'  {"a": 1}', None),
        (b'{"a": 1} x', "Extra data at 9"),
        (b'{"a": 1}{}', "Extra data at 8"),
        (b'{"a": }', "Expecting value at 6"),
        (b'{"a": 1', "Expecting ',' delimiter at 7"),
        (b'{"a": NaN}', "not strict JSON"),
    ],
)
def test_a_json_object_is_read_or_refused_with_the_decoder_s_own_reason(
    payload: bytes, detail: str | None
) -> None:
    """load_object's shortcut (the C scanner, for a text that starts as an object) reads
    what `json` reads and refuses the rest as `json` says, whitespace around it or not."""
    if detail is None:
        assert fields.load_object(payload) == {"a": 1}
    else:
        with pytest.raises(TelemetryError) as refused:
            fields.load_object(payload)
        assert refused.value.reason == "bad_json"
        assert detail in str(refused.value)

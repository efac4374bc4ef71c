"""Strict JSON and field readers for untrusted payloads: every failure is a TelemetryError.

Anything a phone sends passes here, so "valid" is narrower than Python's json module:
no NaN or Infinity, no number that does not fit a float, no nesting deeper than the
interpreter can recurse, strings that are real Unicode (no lone surrogates, no NUL,
which neither SQLite's UTF-8 binding nor PostgreSQL's text type accepts), and
timestamps that are RFC 3339 exactly and representable in UTC.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from courierd.domain.model import format_ts
from courierd.errors import TelemetryError

MAX_NUMBER_DIGITS = 40  # longer integer literals are not telemetry (Python would parse 4,300)
MAX_TEXT = 256  # courier names, phones, vehicle fields, event ids
MAX_ID = 128  # order ids (they go into URL paths)

# What an identifier may not hold (CONTRACT.md 12): C0 controls (NUL, CR, LF, ESC...),
# DEL, C1 controls (NEL among them), and the Unicode line and paragraph separators.
# Each of these can end a log line, or rewrite the terminal it is shown on, so an id
# holding one could forge a line that looks like courierd's own.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")

# RFC 3339 section 5.6: date-time = full-date "T" full-time; "t" and a space are allowed
# separators, "z" for "Z"; the offset is Z or +HH:MM, never +HHMM or a week date.
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:[Zz]|([+-])(\d{2}):(\d{2}))",
    re.ASCII,  # \d is 0-9 only: not the other scripts' digits
)
# The stored format (`model.format_ts`), and the same without a fraction: a subset of
# _RFC3339 that is cheaper to match (`stored_rfc3339`).
_STORED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{3})?Z", re.ASCII)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text) > MAX_NUMBER_DIGITS:
        raise ValueError(f"integer of {len(text)} digits")
    return int(text)


_DECODER = json.JSONDecoder(
    parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_bounded_int
)
# The decoder's own scanner (C), for a text that is an object from its first character
# to its last: what `decode` does, without its two Python frames and whitespace regexes.
# (Set by JSONDecoder.__init__, not in typeshed's stub.)
_SCAN: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]


def load_object(payload: bytes) -> dict[str, Any]:
    """A JSON object from UTF-8 bytes, or TelemetryError (bad_utf8, bad_json, not_object)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TelemetryError("bad_utf8", f"payload is not UTF-8 ({e.reason} at {e.start})") from e
    try:
        if text[:1] == "{":
            try:
                doc, end = _SCAN(text, 0)
            except StopIteration:  # a value missing inside: `decode` says where
                doc, end = _DECODER.decode(text), len(text)
            # More after it: `decode` refuses it, with its message. JSON's own whitespace
            # (a newline many publishers end with) is all `decode` would skip.
            if end != len(text) and text[end:].strip(" \t\n\r"):
                doc = _DECODER.decode(text)
        else:
            doc = _DECODER.decode(text)
    except json.JSONDecodeError as e:
        raise TelemetryError("bad_json", f"payload is not JSON ({e.msg} at {e.pos})") from e
    except RecursionError:
        raise TelemetryError("bad_json", "payload is nested too deeply") from None
    except ValueError as e:  # from the hooks above
        raise TelemetryError("bad_json", f"payload is not strict JSON ({e})") from None
    if not isinstance(doc, dict):
        raise TelemetryError("not_object", f"payload is a JSON {type(doc).__name__}, not an object")
    return doc


def check_text(value: str, name: str, limit: int = MAX_TEXT) -> str:
    """A string that every store and OneTablet can take: valid Unicode, no NUL, bounded."""
    if len(value) > limit:
        raise TelemetryError("too_long", f"{name} is {len(value)} characters (at most {limit})")
    if "\x00" in value:
        raise TelemetryError("bad_unicode", f"{name} contains a NUL character")
    if value.isascii():  # no lone surrogate (what an app sends, nearly always)
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise TelemetryError("bad_unicode", f"{name} contains a lone surrogate") from None
    return value


def check_id(value: str, name: str, limit: int = MAX_TEXT) -> str:
    """An identifier (order, courier, event): storable text without control characters,
    else TelemetryError(bad_id). A lone surrogate stays `bad_unicode`: it is not a
    character at all, and no store takes it."""
    if value.isascii() and value.isprintable() and len(value) <= limit:
        return value  # (what an id nearly always is: `check_text` would pass it as is)
    found = _CONTROL.search(value)
    if found is not None:
        raise TelemetryError(
            "bad_id", f"{name} contains the control character U+{ord(found.group()):04X}"
        )
    return check_text(value, name, limit)


def string(
    doc: Mapping[str, Any],
    key: str,
    *,
    required: bool = False,
    where: str = "",
    limit: int = MAX_TEXT,
) -> str | None:
    """An optional (or required, non-empty) string field."""
    value = doc.get(key)
    # What `check_text` passes as is, without it: nearly every field.
    if (
        type(value) is str
        and value
        and len(value) <= limit
        and value.isascii()
        and "\x00" not in value
    ):
        return value
    name = f"{where}.{key}" if where else key
    if value is None:
        if required:
            raise TelemetryError("missing_field", f"{name} is required")
        return None
    if not isinstance(value, str):
        raise TelemetryError("wrong_type", f"{name} must be a string")
    if required and not value:
        raise TelemetryError("missing_field", f"{name} is empty")
    return check_text(value, name, limit)


def required_string(doc: Mapping[str, Any], key: str, limit: int = MAX_TEXT) -> str:
    value = string(doc, key, required=True, limit=limit)
    assert value is not None
    return value


def order_id(doc: Mapping[str, Any], key: str = "order_id") -> str:
    """1-128 characters without '/': it becomes a path segment of OneTablet's URLs."""
    value = doc.get(key)
    if value is None:
        raise TelemetryError("missing_field", f"{key} is required")
    if not isinstance(value, str):
        raise TelemetryError("wrong_type", f"{key} must be a string")
    if not value or len(value) > MAX_ID or "/" in value:
        raise TelemetryError(
            "bad_order_id", f"{key} {value[:40]!r} must be 1-128 characters without '/'"
        )
    return check_id(value, key, MAX_ID)


def required_id(doc: Mapping[str, Any], key: str, limit: int = MAX_TEXT) -> str:
    """A required, non-empty identifier field (see `check_id`)."""
    value = doc.get(key)
    if value is None or value == "":
        raise TelemetryError("missing_field", f"{key} is required")
    if not isinstance(value, str):
        raise TelemetryError("wrong_type", f"{key} must be a string")
    return check_id(value, key, limit)


def number(
    doc: Mapping[str, Any],
    key: str,
    *,
    required: bool = False,
    low: float = -math.inf,
    high: float = math.inf,
    where: str = "",
) -> float | None:
    """An optional (or required) finite number within [low, high]."""
    name = f"{where}.{key}" if where else key
    value = doc.get(key)
    if value is None:
        if required:
            raise TelemetryError("missing_field", f"{name} is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TelemetryError("wrong_type", f"{name} must be a number")
    result = float(value)  # ints are at most MAX_NUMBER_DIGITS long: this cannot overflow
    if not low <= result <= high:
        raise TelemetryError("out_of_range", f"{name} {result:g} is outside {low:g}..{high:g}")
    return result


def position(
    doc: Mapping[str, Any], lat_key: str, lng_key: str, where: str = ""
) -> tuple[float, float]:
    """A required latitude/longitude pair on Earth."""
    lat = number(doc, lat_key, required=True, low=-90, high=90, where=where)
    lng = number(doc, lng_key, required=True, low=-180, high=180, where=where)
    assert lat is not None and lng is not None
    return lat, lng


def parse_rfc3339(text: str) -> datetime:
    """An RFC 3339 date-time as an aware UTC datetime, or TelemetryError(bad_ts)."""
    return _rfc3339(text)[0]


def stored_rfc3339(text: str) -> tuple[datetime, str]:
    """`parse_rfc3339`, and the instant in the stored format (`model.format_ts`). For a
    time in UTC ("Z", what apps send), that text is written from the digits as given:
    the same text as `format_ts` writes (a fraction cut to milliseconds), for a fifth
    of its cost. Any other offset, or a leap second, goes through `format_ts`."""
    # The stored format itself (or it without a fraction: ".000" then), what apps send
    # nearly always: a narrower regex, and the text as it stands. A leap second, an
    # hour past 23 (from Python 3.14 on, datetime reads 24:00 as midnight) or an
    # invalid date go the full way below, which refuses them or says why.
    if _STORED.fullmatch(text) and text[11:13] <= "23" and text[17:19] != "60":
        try:  # in UTC already: what `astimezone(UTC)` gives back as is
            when = datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            return when, text if len(text) == 24 else f"{text[:19]}.000Z"
    when, m = _rfc3339(text)
    second = m.group(6)
    if m.group(8) is None and second != "60":
        year, month, day, hour, minute = m.group(1, 2, 3, 4, 5)
        millis = (m.group(7) or "")[:3].ljust(3, "0")
        return when, f"{year}-{month}-{day}T{hour}:{minute}:{second}.{millis}Z"
    return when, format_ts(when)


def _rfc3339(text: str) -> tuple[datetime, re.Match[str]]:
    m = _RFC3339.fullmatch(text)
    if m is None:
        raise TelemetryError("bad_ts", f"ts {text[:40]!r} is not RFC 3339 (date, time and offset)")
    hour, second, off_m = m.group(4, 6, 10)
    try:
        # datetime takes neither check from the text alone: minutes of an offset past 59
        # pass, and from Python 3.14 on, 24:00:00 is the next day's midnight.
        if off_m is not None and off_m > "59":
            raise ValueError("offset out of range")
        if hour > "23":
            raise ValueError("hour must be in 0..23")
        if second != "60":
            # The regex made it RFC 3339; datetime's own (C) parser is then four times
            # faster than building it by hand, once "t" and "z" are upper case.
            return datetime.fromisoformat(text.upper()).astimezone(UTC), m
        # A leap second: Python has none, the instant before is as good.
        offset = text[m.end(7) if m.group(7) else m.end(6) :]
        leap = datetime.fromisoformat(f"{text[:17]}59.999999{offset}".upper())
        return leap.astimezone(UTC), m
    except (ValueError, OverflowError) as e:
        raise TelemetryError("bad_ts", f"ts {text[:40]!r} is not a valid instant ({e})") from None


def timestamp(doc: Mapping[str, Any], key: str = "ts", *, required: bool) -> datetime | None:
    """An optional (or required) RFC 3339 field."""
    text = string(doc, key, required=required, limit=64)
    return None if text is None else parse_rfc3339(text)


def stored_timestamp(
    doc: Mapping[str, Any], key: str = "ts", *, required: bool
) -> tuple[datetime, str] | None:
    """An optional (or required) RFC 3339 field, and its text in the stored format."""
    text = string(doc, key, required=required, limit=64)
    return None if text is None else stored_rfc3339(text)


def epoch_seconds(value: float, name: str) -> datetime:
    """A unix time (OwnTracks `tst`) as a UTC datetime, or TelemetryError(bad_ts)."""
    try:
        return datetime.fromtimestamp(value, UTC)
    except (ValueError, OverflowError, OSError) as e:
        raise TelemetryError("bad_ts", f"{name} {value:g} is not a valid time ({e})") from None


def not_in_future(
    when: datetime, now: float, slack_s: float, name: str = "ts", stored: str | None = None
) -> str:
    """`when` in the stored format (`stored`, if the caller has it), unless it is more
    than `slack_s` ahead of `now`."""
    if when.timestamp() > now + slack_s:
        raise TelemetryError(
            "future_ts", f"{name} {format_ts(when)} is more than {slack_s:.0f} s in the future"
        )
    return format_ts(when) if stored is None else stored

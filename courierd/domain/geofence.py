"""Statuses inferred from location fixes: the geofence rules of CONTRACT.md 7, pure.

Two steps, both plain functions of plain values (no I/O, no clock; times are the fixes'
own `ts`, so buffered fixes sent late replay exactly as they would have live):

- `screen` is the per-courier filter: it drops fixes that are inaccurate, not newer than
  the courier's last accepted one, or that would need an impossible speed to reach.
- `step` takes one accepted fix of the order's bound courier and the order's `Track`
  (the little state the rules need, stored per order as JSON) and returns the new track
  and at most one status to infer, the furthest the rules justify. The caller turns it
  into an ordinary status event (`lifecycle.decide` fills skipped statuses, drops stale
  ones and keeps cancelled orders cancelled).

Why these rules do not flap. A naive geofence (Traccar's, for one) fires enter and exit
on every crossing of the circle, so a courier parked at its edge, or one GPS glitch,
produces a stream of events. Here a status is only ever inferred forwards, and each rule
needs sustained evidence:

- *Filters*: a fix whose reported accuracy is worse than `max_accuracy_m`, or which is
  further from the last accepted fix than `max_speed_mps` allows, never reaches the rules.
- *Dwell*: arrival needs the courier inside the radius for `dwell_s` AND across
  `min_fixes` consecutive fixes; any fix outside starts the streak over. One fix inside
  (a drive-by, a glitch) is not an arrival, nor are two fixes a second apart.
- *Hysteresis*: departure is judged against `exit_factor` x radius, not the radius
  itself, so noise around the edge of the circle is neither in nor out; it needs
  `min_fixes` consecutive fixes beyond it, and only once the order has sat at
  `arrived_at_store` for `depart_after_s` (a courier who just arrived is not leaving).
- *Dropoff* is off unless `auto_dropoff`: telling a customer their food is at the door
  on a guess is worse than waiting for the courier to tap the button.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from courierd.domain.geo import M_PER_DEG_LAT, SHORTCUT_MARGIN_M, between, beyond, within
from courierd.domain.lifecycle import CHAIN
from courierd.domain.model import NEW, Place, Status, dumps

_RANK: dict[str, int] = {NEW: -1, **{s.value: i for i, s in enumerate(CHAIN)}}
_ARRIVING = _RANK[Status.ARRIVING_AT_STORE.value]
_ARRIVED = _RANK[Status.ARRIVED_AT_STORE.value]
_OUT = _RANK[Status.DASHER_OUT_FOR_DELIVERY.value]
_DROPOFF = _RANK[Status.DROPOFF.value]


@dataclass(frozen=True, slots=True)
class GeofenceRules:
    """The `[geofence]` settings the rules use (`enabled` is the caller's business)."""

    max_accuracy_m: float = 50.0
    max_speed_mps: float = 50.0
    approach_m: float = 1000.0
    radius_m: float = 100.0
    dwell_s: float = 30.0
    min_fixes: int = 2
    depart_after_s: float = 60.0
    exit_factor: float = 2.0
    auto_dropoff: bool = False
    dropoff_radius_m: float = 50.0
    dropoff_dwell_s: float = 60.0


class Fix(NamedTuple):
    """One location fix; `ts` is the fix's own unix time in seconds.

    A NamedTuple, not a frozen dataclass: two are built for every accepted fix (it and
    the courier's last), and a tuple costs a third as much to build.
    """

    ts: float
    lat: float
    lng: float
    accuracy_m: float | None = None
    speed_mps: float | None = None


def screen(last: Fix | None, fix: Fix, rules: GeofenceRules) -> str | None:
    """None if `fix` is accepted, else why not: "inaccurate", "not_newer" or "too_fast".

    `last` is the courier's last ACCEPTED fix (None before the first). A fix without an
    accuracy is accepted. Comparisons are written so that NaN is rejected, never accepted.

    An outlier that does get accepted (the first fix after a silence, say) heals by
    itself: the distance allowed from it grows with the time since it, so the courier's
    true fixes are accepted again after at most distance ÷ `max_speed_mps` seconds,
    and only they, never the outlier, can then move the rules along.
    """
    if fix.accuracy_m is not None and not fix.accuracy_m <= rules.max_accuracy_m:
        return "inaccurate"
    if last is None:
        return None
    elapsed = fix.ts - last.ts
    if not elapsed > 0:
        return "not_newer"
    if not between(last, fix) <= rules.max_speed_mps * elapsed:
        return "too_fast"
    return None


class Track(NamedTuple):
    """Per-order state of the rules, stored as JSON and rewritten on every accepted fix.

    A NamedTuple, not a frozen dataclass (like `Fix`): `step` builds one for every fix
    of every geofenced order, and a tuple costs a quarter as much to build.

    `last_ts`: the ts of the last fix consumed (an older or equal one changes nothing).
    `seen`, `since`: the order state the track last saw and the ts of the first fix seen
    at it, the start of that status when the caller does not know when it began.
    `inside_since`, `inside_count`: the current streak of fixes within the pickup radius.
    `outside_count`: the current streak of fixes beyond the exit radius (departure).
    `drop_since`, `drop_count`: the current streak of fixes within the dropoff radius.
    """

    last_ts: float | None = None
    seen: str | None = None
    since: float | None = None
    inside_since: float | None = None
    inside_count: int = 0
    outside_count: int = 0
    drop_since: float | None = None
    drop_count: int = 0

    def to_json(self) -> str:
        """Compact JSON; empty streaks are left out."""
        return self.stored()[0]

    def stored(self) -> tuple[str, Track | None]:
        """The JSON text to store, and the track that reading it gives back (None if it
        would not read back: `from_json` refuses what this writes from a track no rule
        makes, such as a time that is not finite).

        The ingest process writes a track for every accepted fix of a geofenced order
        and keeps the value beside the text, so that the next batch need not parse it.
        A track as `step` makes it (times are floats, counts positive) is written by
        hand, several times faster than through a dict and the JSON encoder, into the
        very text the encoder writes (floats as `repr`, which is what it uses).
        """
        if self._canonical():
            parts = []
            if self.last_ts is not None:
                parts.append(f'"last":{float_text(self.last_ts)}')
            if self.seen is not None:  # a state name: nothing in it to escape
                parts.append(f'"seen":"{self.seen}","since":{_since_text(self.since)}')
            if self.inside_count:
                parts.append(f'"in":[{float_text(self.inside_since)},{self.inside_count}]')
            if self.outside_count:
                parts.append(f'"out":{self.outside_count}')
            if self.drop_count:
                parts.append(f'"drop":[{float_text(self.drop_since)},{self.drop_count}]')
            return "{" + ",".join(parts) + "}", self
        doc: dict[str, Any] = {}
        if self.last_ts is not None:
            doc["last"] = self.last_ts
        if self.seen is not None:
            doc["seen"], doc["since"] = self.seen, self.since
        if self.inside_count:
            doc["in"] = [self.inside_since, self.inside_count]
        if self.outside_count:
            doc["out"] = self.outside_count
        if self.drop_count:
            doc["drop"] = [self.drop_since, self.drop_count]
        try:
            back: Track | None = self.read_back()
        except ValueError:
            back = None
        return dumps(doc), back

    def _canonical(self) -> bool:
        """Whether `from_json(to_json())` gives this very track back: every time a finite
        float, every count an int, a streak's start exactly when it has fixes.

        Checked for every track the ingest process writes, so written out without calls
        (`x - x == 0.0`: a float is finite, as `_finite` says)."""
        last, seen, since, in_since, in_count, out, drop_since, drop_count = self
        return (
            (last is None or (type(last) is float and last - last == 0.0))
            and (
                since is None
                if seen is None
                else seen in _RANK and type(since) is float and since - since == 0.0
            )
            and type(in_count) is int
            and (
                in_since is None
                if in_count == 0
                else in_count > 0 and type(in_since) is float and in_since - in_since == 0.0
            )
            and type(drop_count) is int
            and (
                drop_since is None
                if drop_count == 0
                else drop_count > 0 and type(drop_since) is float and drop_since - drop_since == 0.0
            )
            and type(out) is int
            and out >= 0
        )

    def read_back(self) -> Track:
        """What `Track.from_json(self.to_json())` gives, without the JSON (and the same
        ValueError)."""
        last = None if self.last_ts is None else _time(self.last_ts)
        seen: str | None = None
        since: float | None = None
        if self.seen is not None:
            seen, since = self.seen, _time(self.since)
            if seen not in _RANK:
                raise ValueError("track JSON has an unknown `seen` state")
        inside_since, inside_count = (
            (_time(self.inside_since), _count(self.inside_count))
            if self.inside_count
            else (None, 0)
        )
        drop_since, drop_count = (
            (_time(self.drop_since), _count(self.drop_count)) if self.drop_count else (None, 0)
        )
        outside_count = _count(self.outside_count) if self.outside_count else 0
        return Track(
            last, seen, since, inside_since, inside_count, outside_count, drop_since, drop_count
        )

    @classmethod
    def from_json(cls, text: str) -> Track:
        """Read a stored track; ValueError if it is anything but what `to_json` writes."""
        try:
            doc = _DECODER.decode(text)
        except RecursionError as e:
            raise ValueError("track JSON is nested too deeply") from e
        if not isinstance(doc, dict):
            raise ValueError("track JSON is not an object")
        extra = set(doc) - {"last", "seen", "since", "in", "out", "drop"}
        if extra:
            raise ValueError(f"track JSON has unknown keys {sorted(extra)}")
        last = _time(doc["last"]) if "last" in doc else None
        seen: str | None = None
        since: float | None = None
        if "seen" in doc or "since" in doc:
            seen, since = doc.get("seen"), _time(doc.get("since"))
            if not isinstance(seen, str) or seen not in _RANK:
                raise ValueError("track JSON has an unknown `seen` state")
        inside_since, inside_count = _streak(doc["in"]) if "in" in doc else (None, 0)
        drop_since, drop_count = _streak(doc["drop"]) if "drop" in doc else (None, 0)
        outside_count = _count(doc["out"]) if "out" in doc else 0
        return cls(
            last, seen, since, inside_since, inside_count, outside_count, drop_since, drop_count
        )


# Floats below this are at most 2**-10 s (under a millisecond) from the next float: two
# numbers of at most 3 decimals never read back as the same float.
_MS_EXACT = 2.0**42


def float_text(x: float | None) -> str:
    """`repr(x)`, the text the JSON encoder writes for a float, faster for a number of
    at most 3 decimals (a fix's time: stored to the millisecond).

    `repr` writes the shortest decimal that reads back as `x`, and finding it costs
    more than the rest of a track's text. When `x` is within ±2**42 and its nearest
    3-decimal number reads back as `x`, that number (trailing zeros cut, as `repr`
    does, down to ".0") is the one: any other of at most 3 decimals is 0.001 or more
    away, over the spacing of floats there, so none reads back as `x`; any with more
    decimals has more digits. Else (more decimals, huge, NaN), `repr`.
    """
    if type(x) is float and -_MS_EXACT < x < _MS_EXACT:
        text = "%.3f" % x  # noqa: UP031 (the % operator: no method lookup, no parsing)
        if float(text) == x:
            text = text.rstrip("0")
            return text + "0" if text[-1] == "." else text
    return repr(x)


# The text of the `since` times tracks were last written with: a track's `since` stays
# the same from fix to fix while its `last` moves. Bounded (emptied whole when full).
_SINCE_TEXT: dict[float | None, str] = {}


def _since_text(since: float | None) -> str:
    """`float_text(since)`, remembered; not for 0.0 and -0.0 (equal keys, two texts)."""
    text = _SINCE_TEXT.get(since)
    if text is None:
        text = float_text(since)
        if since:
            if len(_SINCE_TEXT) >= 65_536:
                _SINCE_TEXT.clear()
            _SINCE_TEXT[since] = text
    return text


def _reject_constant(name: str) -> Any:
    raise ValueError(f"track JSON holds {name}")


# One decoder: `json.loads` with an option builds a new one per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _time(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("track JSON has a time that is not a number")
    if not math.isfinite(value):
        raise ValueError("track JSON has a time that is not finite")
    return float(value)


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("track JSON has a count that is not a positive integer")
    return value


def _streak(value: Any) -> tuple[float | None, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError("track JSON has a streak that is not [since, count]")
    return _time(value[0]), _count(value[1])


def radius(place: Place, default_m: float) -> float:
    """The place's own radius, else the configured one."""
    return default_m if place.radius_m is None else place.radius_m


def step(
    track: Track,
    status: str,
    status_at: float | None,
    pickup: Place | None,
    dropoff: Place | None,
    fix: Fix,
    rules: GeofenceRules,
) -> tuple[Track, Status | None]:
    """Feed one accepted fix of the bound courier to an order's track.

    `status` is the order's state ("new" or a chain value), `status_at` the unix time it
    reached it (None when unknown: the first fix seen at that status then stands in).
    Returns the new track and at most one status to infer, always ahead of `status`.
    A fix not newer than the last one consumed, or a finished (or unknown) state,
    changes nothing.
    """
    rank = _RANK.get(status)
    if rank is None or rank >= _DROPOFF:
        return track, None
    if track.last_ts is not None and not fix.ts > track.last_ts:
        return track, None
    since = track.since if track.seen == status and track.since is not None else fix.ts
    # Each streak only runs while the order is at the statuses its rule serves; moving
    # on starts the next rule's streak from nothing.
    inside: tuple[float | None, int] = (None, 0)
    outside = 0
    drop: tuple[float | None, int] = (None, 0)
    found: Status | None = None

    if pickup is not None and rank < _ARRIVED:
        r = rules.radius_m if pickup.radius_m is None else pickup.radius_m
        approach_m = rules.approach_m
        reach = approach_m if approach_m > r else r  # max(r, approach_m), NaN and all
        # Beyond both the radius and the approach distance, neither rule fires: most
        # fixes. `beyond`'s meridian bound, written out (no call, no haversine: a far
        # fix costs a few comparisons); nearer, the distance decides (`beyond`'s test).
        if not abs(fix.lat - pickup.lat) * M_PER_DEG_LAT > reach + SHORTCUT_MARGIN_M and not (
            (d := between(fix, pickup)) > reach
        ):
            if d <= r:
                inside = _extend(track.inside_since, track.inside_count, fix.ts)
                if _dwelt(inside, fix.ts, rules.dwell_s, rules.min_fixes):
                    found = Status.ARRIVED_AT_STORE
            if found is None and rank < _ARRIVING and d <= rules.approach_m:
                found = Status.ARRIVING_AT_STORE
    elif pickup is not None and rank == _ARRIVED:
        start = since if status_at is None else status_at
        exit_m = rules.exit_factor * radius(pickup, rules.radius_m)
        if fix.ts >= start + rules.depart_after_s and beyond(fix, pickup, exit_m):
            outside = track.outside_count + 1
            if outside >= rules.min_fixes:
                found = Status.DASHER_OUT_FOR_DELIVERY
    elif (
        dropoff is not None
        and rank == _OUT
        and rules.auto_dropoff
        and within(fix, dropoff, radius(dropoff, rules.dropoff_radius_m))
    ):
        drop = _extend(track.drop_since, track.drop_count, fix.ts)
        if _dwelt(drop, fix.ts, rules.dropoff_dwell_s, rules.min_fixes):
            found = Status.DROPOFF

    after: Track = _new_track(
        Track, (fix.ts, status, since, inside[0], inside[1], outside, drop[0], drop[1])
    )
    return after, found


# `Track(...)` less its Python-level `__new__` (a NamedTuple's, which only passes its
# arguments on to this): one is built for every fix of every geofenced order.
_new_track = tuple.__new__


def _extend(since: float | None, count: int, ts: float) -> tuple[float, int]:
    """The streak after one more fix in it (a new streak starts at `ts`)."""
    if since is None or count == 0:
        return ts, 1
    return since, count + 1


def _dwelt(streak: tuple[float | None, int], ts: float, dwell_s: float, min_fixes: int) -> bool:
    """Whether a streak is long enough in both time and fixes."""
    start, count = streak
    return start is not None and count >= min_fixes and ts - start >= dwell_s

"""The geofence rules' shortcuts give exactly what the rules written plainly give.

`geofence.step` decides a far fix without a haversine (the meridian bound, written out)
and the ingest process writes each track's times without `repr` (`float_text`). Both
are only worth having if nothing anyone sees changes: these properties set them against
the plain definitions over random fixes, places, tracks and numbers.
"""

from __future__ import annotations

import math

from hypothesis import example, given
from hypothesis import strategies as st

from courierd.domain.geo import EARTH_RADIUS_M, between
from courierd.domain.geofence import Fix, GeofenceRules, Track, float_text, step
from courierd.domain.lifecycle import CHAIN
from courierd.domain.model import NEW, Place, Status, dumps

M_PER_DEG = EARTH_RADIUS_M * math.pi / 180
RANK = {NEW: -1, **{s.value: i for i, s in enumerate(CHAIN)}}


def plain_step(
    track: Track,
    status: str,
    status_at: float | None,
    pickup: Place | None,
    dropoff: Place | None,
    fix: Fix,
    rules: GeofenceRules,
) -> tuple[Track, Status | None]:
    """The rules as README's "Geofences" states them, every distance a haversine."""
    rank = RANK.get(status)
    if rank is None or rank >= RANK["dropoff"]:
        return track, None
    if track.last_ts is not None and not fix.ts > track.last_ts:
        return track, None
    since = track.since if track.seen == status and track.since is not None else fix.ts

    def extend(start: float | None, count: int) -> tuple[float | None, int]:
        return (fix.ts, 1) if start is None or count == 0 else (start, count + 1)

    def dwelt(streak: tuple[float | None, int], dwell_s: float) -> bool:
        start, count = streak
        return start is not None and count >= rules.min_fixes and fix.ts - start >= dwell_s

    inside: tuple[float | None, int] = (None, 0)
    outside = 0
    drop: tuple[float | None, int] = (None, 0)
    found = None
    if pickup is not None and rank < RANK["arrived_at_store"]:
        r = rules.radius_m if pickup.radius_m is None else pickup.radius_m
        d = between(fix, pickup)
        if d <= r:
            inside = extend(track.inside_since, track.inside_count)
            if dwelt(inside, rules.dwell_s):
                found = Status.ARRIVED_AT_STORE
        if found is None and rank < RANK["arriving_at_store"] and d <= rules.approach_m:
            found = Status.ARRIVING_AT_STORE
    elif pickup is not None and rank == RANK["arrived_at_store"]:
        r = rules.radius_m if pickup.radius_m is None else pickup.radius_m
        start = since if status_at is None else status_at
        if fix.ts >= start + rules.depart_after_s and between(fix, pickup) > rules.exit_factor * r:
            outside = track.outside_count + 1
            if outside >= rules.min_fixes:
                found = Status.DASHER_OUT_FOR_DELIVERY
    elif dropoff is not None and rank == RANK["dasher_out_for_delivery"] and rules.auto_dropoff:
        r = rules.dropoff_radius_m if dropoff.radius_m is None else dropoff.radius_m
        if between(fix, dropoff) <= r:
            drop = extend(track.drop_since, track.drop_count)
            if dwelt(drop, rules.dropoff_dwell_s):
                found = Status.DROPOFF
    return Track(fix.ts, status, since, *inside, outside, *drop), found


LAT = st.floats(-89.9, 89.9)
LNG = st.floats(-180, 180)
# Distances around every limit the rules compare (radii, approach, exit, dropoff), and
# far: a fix is placed this far from the place, in a random direction.
METRES = (
    st.floats(0, 3000)
    | st.sampled_from([0.0, 50.0, 100.0, 160.0, 200.0, 1000.0])
    | st.floats(0, 2e7)
)
RADII = st.none() | st.floats(1, 2000)
TIMES = st.floats(1e9, 2e9)


@st.composite
def cases(draw: st.DrawFn) -> tuple[Track, str, float | None, Place, Place, Fix, GeofenceRules]:
    pickup = Place(draw(LAT), draw(LNG), draw(RADII))
    dropoff = Place(draw(LAT), draw(LNG), draw(RADII))
    near = draw(st.sampled_from([pickup, dropoff]))
    d, bearing = draw(METRES), draw(st.floats(0, 2 * math.pi))
    north, east = d * math.cos(bearing), d * math.sin(bearing)
    if draw(st.booleans()):  # due north or south: where the meridian bound is tight
        north, east = draw(st.sampled_from([d, -d])), 0.0
    lat = max(-90.0, min(90.0, near.lat + north / M_PER_DEG))
    lng = near.lng + east / (M_PER_DEG * max(1e-6, math.cos(math.radians(near.lat))))
    lng = (lng + 180.0) % 360.0 - 180.0
    ts = draw(TIMES)
    fix = Fix(ts, lat, lng)
    counts = st.integers(0, 5)
    inside, out, dropped = draw(counts), draw(counts), draw(counts)
    status = draw(st.sampled_from([NEW, *(s.value for s in CHAIN)]))
    track = Track(
        draw(st.none() | st.floats(ts - 100, ts + 1)),
        draw(st.sampled_from([None, status, NEW])),
        None,
        ts - draw(st.floats(0, 100)) if inside else None,
        inside,
        out,
        ts - draw(st.floats(0, 100)) if dropped else None,
        dropped,
    )
    if track.seen is not None:
        track = track._replace(since=ts - draw(st.floats(0, 300)))
    rules = GeofenceRules(
        radius_m=draw(st.floats(1, 2000)),
        approach_m=draw(st.sampled_from([1000.0, 150.0, 50.0, 3000.0])),
        dwell_s=draw(st.sampled_from([0.0, 30.0])),
        min_fixes=draw(st.integers(1, 3)),
        depart_after_s=draw(st.sampled_from([0.0, 60.0])),
        exit_factor=draw(st.sampled_from([1.0, 2.0])),
        auto_dropoff=draw(st.booleans()),
        dropoff_radius_m=draw(st.floats(1, 500)),
        dropoff_dwell_s=draw(st.sampled_from([0.0, 60.0])),
    )
    status_at = draw(st.none() | st.floats(ts - 300, ts))
    return track, status, status_at, pickup, dropoff, fix, rules


def north_of_pickup(
    metres: float, status: str, radius_m: float, rules: GeofenceRules
) -> tuple[Track, str, float | None, Place, Place, Fix, GeofenceRules]:
    """A fresh track's case: a fix due north of a pickup at (0, 0), `metres` from it."""
    pickup, dropoff = Place(0.0, 0.0, radius_m), Place(1.0, 1.0)
    return Track(), status, None, pickup, dropoff, Fix(1.7e9, metres / M_PER_DEG, 0.0), rules


@given(cases())
# Due north of the pickup at exactly the approach distance, and a hair over it; and a
# place's radius beyond the approach distance (the bound is then the radius).
@example(north_of_pickup(1000.0, "dasher_confirmed", 100.0, GeofenceRules()))
@example(north_of_pickup(1000.001, "dasher_confirmed", 100.0, GeofenceRules()))
@example(
    north_of_pickup(1400.0, "arriving_at_store", 1500.0, GeofenceRules(dwell_s=0.0, min_fixes=1))
)
def test_step_decides_as_the_plain_rules(
    case: tuple[Track, str, float | None, Place, Place, Fix, GeofenceRules],
) -> None:
    """Whatever the fix, places, track and settings, `step` (with its shortcut for a fix
    far from the place) returns the very track and status of the rules computed with a
    haversine for every distance."""
    track, status, status_at, pickup, dropoff, fix, rules = case
    assert step(track, status, status_at, pickup, dropoff, fix, rules) == plain_step(
        track, status, status_at, pickup, dropoff, fix, rules
    )


# A fix's time is stored to the millisecond: the numbers `float_text` is there for, and
# others, around the limit where its shortcut stops (2**42) and past it.
MS_TIMES = st.integers(-(2**53), 2**53).map(lambda ms: ms / 1000)
NEAR_LIMIT = st.integers(2**42 * 1000 - 10**6, 2**44 * 1000).map(lambda ms: ms / 1000)


@given(st.floats(allow_nan=True, allow_infinity=True) | MS_TIMES | NEAR_LIMIT | TIMES)
@example(0.0)
@example(-0.0)
@example(1e-4)
@example(0.001)
@example(2.0**42)
@example(2.0**42 - 2.0**-10)
@example(1_765_000_000.12)
@example(1_765_000_000.0)
def test_float_text_is_repr(x: float) -> None:
    """What a track's times are written as is what `repr` (and the JSON encoder) write."""
    assert float_text(x) == repr(x)


@given(MS_TIMES, st.sampled_from([None, NEW, "arrived_at_store"]), MS_TIMES, st.integers(0, 3))
def test_track_text_of_millisecond_times_is_the_encoders(
    last: float, seen: str | None, since: float, count: int
) -> None:
    """A track as the ingest process writes it (times of whole milliseconds) is written
    as the JSON encoder writes it."""
    track = Track(last, seen, None if seen is None else since, since if count else None, count)
    text, _ = track.stored()
    doc: dict[str, object] = {"last": last}
    if seen is not None:
        doc["seen"], doc["since"] = seen, since
    if count:
        doc["in"] = [since, count]
    assert text == dumps(doc)

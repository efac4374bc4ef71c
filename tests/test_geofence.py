"""The geofence rules (CONTRACT.md 7) and the ETA (CONTRACT.md 9), with plain values.

Positions are built by moving metres away from a pickup in Berlin; moving north is exact
on the haversine sphere, moving east is a local projection (close enough at these scales).
A `Courier` plays the caller's part: screen each fix, step the order's track (through its
JSON, as the store would), and apply whatever status comes back.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from courierd.domain import lifecycle
from courierd.domain.geo import (
    EARTH_RADIUS_M,
    Eta,
    between,
    beyond,
    distance_m,
    eta,
    eta_speed,
    within,
)
from courierd.domain.geofence import Fix, GeofenceRules, Track, screen, step
from courierd.domain.lifecycle import CHAIN
from courierd.domain.model import (
    CANCELLED,
    NEW,
    Order,
    Outcome,
    Place,
    Status,
    StatusEvent,
    dumps,
    iso,
)
from courierd.errors import InputError

ORIGIN = (52.52, 13.405)
M_PER_DEG = EARTH_RADIUS_M * math.pi / 180
T0 = 1_760_000_000.0
RULES = GeofenceRules()
RANK = {NEW: -1, **{s.value: i for i, s in enumerate(CHAIN)}}
ARRIVING, ARRIVED = Status.ARRIVING_AT_STORE, Status.ARRIVED_AT_STORE
OUT, DROPOFF = Status.DASHER_OUT_FOR_DELIVERY, Status.DROPOFF
NOW = "2026-01-01T00:00:00.000Z"


def moved(
    north_m: float, east_m: float, origin: tuple[float, float] = ORIGIN
) -> tuple[float, float]:
    """The point `north_m` north and `east_m` east of `origin` (local projection)."""
    lat = origin[0] + north_m / M_PER_DEG
    return lat, origin[1] + east_m / (M_PER_DEG * math.cos(math.radians(origin[0])))


def polar(dist_m: float, bearing: float) -> tuple[float, float]:
    """(north, east) metres for a distance along a bearing in radians."""
    return dist_m * math.cos(bearing), dist_m * math.sin(bearing)


def fix(
    ts: float, north_m: float = 0.0, east_m: float = 0.0, accuracy_m: float | None = None
) -> Fix:
    """A fix `ts` seconds after T0, at metres from the pickup."""
    return Fix(T0 + ts, *moved(north_m, east_m), accuracy_m)


PICKUP = Place(*ORIGIN)
CUSTOMER = Place(*moved(0, 2000))


@dataclass
class Courier:
    """Screen + step for one order, applying each inferred status as the caller would."""

    status: str = Status.DASHER_CONFIRMED.value
    status_at: float | None = None
    pickup: Place | None = PICKUP
    dropoff: Place | None = CUSTOMER
    rules: GeofenceRules = RULES
    track: Track = field(default_factory=Track)
    last: Fix | None = None
    screened: bool = True  # False: step sees every fix, as if the courier's last were lost
    emitted: list[tuple[float, Status]] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)

    def feed(self, f: Fix) -> Status | None:
        reason = screen(self.last, f, self.rules) if self.screened else None
        if reason is not None:
            self.rejected.append(reason)
            return None
        self.last = f
        args = (self.status, self.status_at, self.pickup, self.dropoff, f, self.rules)
        track, found = step(self.track, *args)
        self.track = Track.from_json(track.to_json())
        assert self.track == track
        if found is not None:
            assert RANK[found.value] > RANK[self.status], (found, self.status)
            self.emitted.append((f.ts, found))
            self.status, self.status_at = found.value, f.ts
        return found

    def run(self, fixes: list[Fix]) -> list[Status]:
        for f in fixes:
            self.feed(f)
        return self.statuses

    @property
    def statuses(self) -> list[Status]:
        return [s for _, s in self.emitted]


# -- plain values ---------------------------------------------------------------------


def test_distance_of_one_degree() -> None:
    """One degree of latitude, or of longitude on the equator, is about 111.2 km."""
    assert distance_m(0, 0, 1, 0) == pytest.approx(M_PER_DEG)
    assert distance_m(0, 0, 0, 1) == pytest.approx(M_PER_DEG)
    assert distance_m(10, 20, -10, -160) == pytest.approx(math.pi * EARTH_RADIUS_M)
    assert distance_m(*ORIGIN, *moved(1000, 0)) == pytest.approx(1000)


LATS = st.floats(-90, 90)
LNGS = st.floats(-180, 180)


@given(LATS, LNGS, LATS, LNGS, st.floats(allow_infinity=True) | st.floats(0, 3e6))
@example(0.0, 0.0, 1.0, 0.0, M_PER_DEG)  # on one meridian: the shortcut's own bound
@example(0.0, 0.0, 1.0, 0.0, M_PER_DEG * (1 - 2e-9))  # the shortcut, a hair inside
@example(0.0, 0.0, 1e-9, 0.0, 1e-4)
@example(45.0, 10.0, 45.0, 10.0, 0.0)
@example(1e-243, 0.0, 0.0, 0.0, 0.0)  # the haversine underflows to 0
@example(0.0, 0.0, 1.0, 0.0, math.nan)
def test_beyond_and_within_answer_as_between_does(
    lat1: float, lng1: float, lat2: float, lng2: float, limit: float
) -> None:
    """The rules' shortcuts (no haversine when the latitudes alone are far enough apart)
    give the very answer of the distance they skip, on either side of any limit."""
    a, b = Place(lat1, lng1), Place(lat2, lng2)
    d = between(a, b)
    assert beyond(a, b, limit) is (d > limit)
    assert within(a, b, limit) is (d <= limit)
    assert beyond(a, b, d) is False and within(a, b, d) is True  # at exactly the distance


@pytest.mark.parametrize(("north_m", "fires"), [(999, True), (1001, False)])
def test_approach_radius(north_m: float, fires: bool) -> None:
    """A courier 999 m from the store is arriving; at 1001 m not yet."""
    c = Courier()
    c.feed(fix(0, north_m))
    assert c.statuses == ([ARRIVING] if fires else [])


def test_arriving_fills_from_new() -> None:
    """A bound order still at `new` gets arriving_at_store when its courier comes near."""
    assert Courier(status=NEW).run([fix(0, 500)]) == [ARRIVING]


def test_dwell_needs_time() -> None:
    """Fixes inside the radius for less than dwell_s are not an arrival."""
    c = Courier(status=ARRIVING.value)
    assert c.run([fix(t, 10) for t in range(0, 30, 5)]) == []
    assert c.feed(fix(30, 10)) == ARRIVED


def test_dwell_needs_fixes() -> None:
    """One fix inside, however long ago the streak began, is not an arrival with min_fixes=3."""
    c = Courier(status=ARRIVING.value, rules=GeofenceRules(min_fixes=3))
    assert c.run([fix(0, 10), fix(100, 10)]) == []
    assert c.feed(fix(101, 10)) == ARRIVED


def test_fix_outside_restarts_dwell() -> None:
    """Leaving the radius, even for one fix, starts the dwell over."""
    c = Courier(status=ARRIVING.value)
    assert c.run([fix(0), fix(20, 150), fix(40), fix(50)]) == []
    assert c.feed(fix(70)) == ARRIVED


def test_place_radius_overrides_default() -> None:
    """A store imported with its own radius is judged by that radius."""
    near = [fix(0, 150), fix(40, 150)]
    assert Courier(status=ARRIVING.value).run(near) == []
    assert Courier(status=ARRIVING.value, pickup=Place(*ORIGIN, 200)).run(near) == [ARRIVED]


def test_arrival_jumps_straight_from_confirmed() -> None:
    """A courier first seen already parked at the store gets arriving, then arrived."""
    assert Courier().run([fix(0), fix(15), fix(30)]) == [ARRIVING, ARRIVED]


def test_departure_waits_for_depart_after_s() -> None:
    """Fixes far from the store count towards departure only depart_after_s after arrival."""
    c = Courier(status=ARRIVED.value, status_at=T0)
    assert c.run([fix(t, 500) for t in (10, 20, 30, 40, 50)]) == []
    assert c.feed(fix(60, 500)) is None
    assert c.feed(fix(65, 500)) == OUT


def test_departure_start_defaults_to_first_fix_seen() -> None:
    """With no known arrival time, the first fix seen at arrived_at_store starts the wait."""
    c = Courier(status=ARRIVED.value, status_at=None)
    assert c.run([fix(t, 500) for t in (0, 30, 59)]) == []
    assert c.run([fix(60, 500), fix(61, 500)]) == [OUT]


def test_departure_hysteresis() -> None:
    """Wandering between the radius and exit_factor x radius neither arrives nor leaves."""
    c = Courier(status=ARRIVED.value, status_at=T0 - 1000)
    assert c.run([fix(0, 250), fix(5, 150), fix(10, 250), fix(15, 199), fix(20, 250)]) == []
    assert c.feed(fix(25, 201)) == OUT


def test_no_status_at_or_behind() -> None:
    """A courier back at the store after leaving changes nothing."""
    c = Courier(status=OUT.value, status_at=T0 - 1000)
    assert c.run([fix(t) for t in range(0, 300, 10)]) == []


def test_auto_dropoff_off_by_default() -> None:
    """Waiting at the customer's door does not mark the order dropped off by default."""
    at_door = [Fix(T0 + t, CUSTOMER.lat, CUSTOMER.lng) for t in range(0, 600, 10)]
    assert Courier(status=OUT.value).run(at_door) == []
    on = Courier(status=OUT.value, rules=GeofenceRules(auto_dropoff=True))
    assert on.run(at_door) == [DROPOFF]
    assert on.emitted[0][0] == T0 + 60


def test_dropoff_waits_for_out_for_delivery() -> None:
    """Auto dropoff never fires for an order that has not left the store."""
    at_door = [Fix(T0 + t, CUSTOMER.lat, CUSTOMER.lng) for t in range(0, 600, 10)]
    rules = GeofenceRules(auto_dropoff=True)
    assert Courier(status=ARRIVED.value, pickup=None, rules=rules).run(at_door) == []


def test_unknown_places_infer_nothing() -> None:
    """Without a pickup no store status is inferred; without a dropoff no dropoff."""
    parked = [fix(t) for t in range(0, 300, 10)]
    assert Courier(pickup=None).run(parked) == []
    assert Courier(status=ARRIVED.value, pickup=None).run([fix(t, 5000) for t in (0, 99)]) == []
    rules = GeofenceRules(auto_dropoff=True)
    assert Courier(status=OUT.value, dropoff=None, rules=rules).run(parked) == []


@pytest.mark.parametrize("status", [Status.DROPOFF.value, CANCELLED, "bogus"])
def test_finished_orders_untouched(status: str) -> None:
    """A finished order's track is left as it was."""
    track = Track(last_ts=T0)
    assert step(track, status, None, PICKUP, CUSTOMER, fix(10), RULES) == (track, None)


def test_screen_reasons() -> None:
    """Inaccurate, stale and impossibly fast fixes are ignored, each with its reason."""
    last = fix(0)
    assert screen(None, fix(0, accuracy_m=50.0), RULES) is None
    assert screen(None, fix(0, accuracy_m=None), RULES) is None
    assert screen(None, fix(0, accuracy_m=50.1), RULES) == "inaccurate"
    assert screen(None, fix(0, accuracy_m=math.nan), RULES) == "inaccurate"
    assert screen(last, fix(0), RULES) == "not_newer"
    assert screen(last, fix(-1), RULES) == "not_newer"
    assert screen(last, fix(10, 499), RULES) is None
    assert screen(last, fix(10, 501), RULES) == "too_fast"


def test_screen_outlier_self_heals() -> None:
    """After an accepted 5 km outlier, the courier's true fixes are accepted again in ~100 s."""
    outlier = fix(0, 5000)
    assert screen(outlier, fix(10), RULES) == "too_fast"
    assert screen(outlier, fix(101), RULES) is None


def test_track_json_default_is_small() -> None:
    """A fresh track is stored as an empty object."""
    assert Track().to_json() == "{}"
    assert Track.from_json("{}") == Track()


@st.composite
def tracks(draw: st.DrawFn) -> Track:
    times = st.floats(0, 4e9, allow_nan=False)
    counts = st.integers(0, 10_000)
    inside, drop = draw(counts), draw(counts)
    seen = draw(st.sampled_from([None, NEW, *(s.value for s in CHAIN)]))
    return Track(
        draw(st.none() | times),
        seen,
        None if seen is None else draw(times),
        draw(times) if inside else None,
        inside,
        draw(counts),
        draw(times) if drop else None,
        drop,
    )


@given(tracks())
def test_track_json_round_trip(track: Track) -> None:
    """A stored track reads back exactly as it was written."""
    assert Track.from_json(track.to_json()) == track


def _encoder_text(track: Track) -> str:
    """What the JSON encoder writes for a track (the text stored before `stored`)."""
    doc: dict[str, object] = {}
    if track.last_ts is not None:
        doc["last"] = track.last_ts
    if track.seen is not None:
        doc["seen"], doc["since"] = track.seen, track.since
    if track.inside_count:
        doc["in"] = [track.inside_since, track.inside_count]
    if track.outside_count:
        doc["out"] = track.outside_count
    if track.drop_count:
        doc["drop"] = [track.drop_since, track.drop_count]
    return dumps(doc)


odd_values = st.one_of(
    st.none(),
    st.integers(-3, 3),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["new", "flying"]),
)


@given(tracks() | st.builds(Track, *[odd_values] * 8))
@example(Track(5))  # an int time: "5" reads back as 5.0
@example(Track(5.0, NEW, 1))
@example(Track(5.0, NEW, 1.0, 2, 1))
@example(Track(5.0, None, 1.0))  # a start without a state: not written
def test_stored_track_reads_back_as_kept(track: Track) -> None:
    """What the ingest process keeps beside a written track is exactly what reading the
    text gives back, or nothing when reading it would fail; the text is the one the
    JSON encoder writes, whichever way it was made (by hand, or through the encoder)."""
    text, value = track.stored()
    assert text == _encoder_text(track)
    try:
        expected: Track | None = Track.from_json(text)
    except (ValueError, TypeError):
        expected = None
    assert value == expected
    if value is not None and expected is not None:  # and the same types (5 == 5.0)
        fields = Track._fields
        assert [type(getattr(value, k)) for k in fields] == [
            type(getattr(expected, k)) for k in fields
        ]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "null",
        "[]",
        '"x"',
        '{"x":1}',
        '{"last":"1"}',
        '{"last":true}',
        '{"last":NaN}',
        '{"last":Infinity}',
        '{"last":1e999}',
        '{"seen":"flying","since":1}',
        '{"seen":["new"],"since":1}',
        '{"seen":"new"}',
        '{"in":[1]}',
        '{"in":[1,0]}',
        '{"in":[1,1.5]}',
        '{"in":null}',
        '{"drop":{"since":1}}',
        '{"out":-1}',
        '{"out":true}',
        "[" * 100_000,
    ],
)
def test_track_from_json_rejects_junk(text: str) -> None:
    """A corrupt stored track is detected, not half-read."""
    with pytest.raises(ValueError):
        Track.from_json(text)


def test_eta_known_distance() -> None:
    """1 km from the store at unknown speed is 1300 / 7 s away."""
    pos = Place(*moved(1000, 0))
    got = eta(ARRIVING.value, pos, PICKUP, CUSTOMER, None)
    assert got is not None
    assert got.to == "pickup"
    assert got.distance_m == pytest.approx(1000)
    assert got.seconds == pytest.approx(1300 / 7)
    assert got.as_json() == {"to": "pickup", "distance_m": 1000, "seconds": 186}


@pytest.mark.parametrize(
    ("speed", "used"),
    [(None, 7), (math.nan, 7), (0, 3), (1, 3), (3, 3), (10, 10), (15, 15), (40, 15)],
)
def test_eta_speed_clamp(speed: float | None, used: float) -> None:
    """The courier's speed counts, but only between walking pace and 15 m/s."""
    assert eta_speed(speed) == used
    got = eta(NEW, Place(*moved(1000, 0)), PICKUP, None, speed)
    assert got is not None and got.seconds == pytest.approx(1300 / used)


@pytest.mark.parametrize(
    ("status", "to"),
    [
        (NEW, "pickup"),
        (Status.DASHER_CONFIRMED.value, "pickup"),
        (ARRIVING.value, "pickup"),
        (ARRIVED.value, "pickup"),
        (OUT.value, "dropoff"),
        (DROPOFF.value, None),
        (CANCELLED, None),
    ],
)
def test_eta_target(status: str, to: str | None) -> None:
    """The ETA is to the store until the courier leaves it, then to the customer."""
    got = eta(status, PICKUP, PICKUP, CUSTOMER)
    assert (got.to if got else None) == to
    if got is not None and to == "dropoff":
        assert got.distance_m == pytest.approx(2000, rel=1e-3)


def test_eta_unknown_places() -> None:
    """No ETA without the courier's position or the place they are heading for."""
    assert eta(NEW, None, PICKUP, CUSTOMER) is None
    assert eta(NEW, PICKUP, None, CUSTOMER) is None
    assert eta(OUT.value, PICKUP, PICKUP, None) is None
    assert Eta("dropoff", 0.4, 0.6).as_json() == {"to": "dropoff", "distance_m": 0, "seconds": 1}


# -- properties -----------------------------------------------------------------------

BEARINGS = st.floats(0, 2 * math.pi)
FRACTIONS = st.floats(0, 1)


def parked(samples: list[tuple[float, float, float]], noise_m: float) -> list[Fix]:
    """Fixes around the pickup: (gap s, fraction of `noise_m`, bearing) per fix."""
    fixes, t = [], 0.0
    for gap, frac, bearing in samples:
        t += gap
        fixes.append(fix(t, *polar(frac * noise_m, bearing)))
    return fixes


@settings(max_examples=100, deadline=None)
@given(
    radius=st.none() | st.floats(30, 200),
    samples=st.lists(st.tuples(st.floats(5, 15), FRACTIONS, BEARINGS), min_size=40, max_size=60),
    accuracy=st.lists(st.none() | st.floats(0, 50), min_size=1, max_size=5),
    min_fixes=st.integers(2, 4),
)
def test_parked_courier_arrives_once(
    radius: float | None,
    samples: list[tuple[float, float, float]],
    accuracy: list[float | None],
    min_fixes: int,
) -> None:
    """A courier parked at the store with GPS noise arrives once, on time, and never leaves."""
    rules = GeofenceRules(min_fixes=min_fixes)
    r = rules.radius_m if radius is None else radius
    fixes = [
        Fix(f.ts, f.lat, f.lng, accuracy[i % len(accuracy)])
        for i, f in enumerate(parked(samples, r / 3))
    ]
    assert fixes[-1].ts - fixes[0].ts > 2 * (rules.dwell_s + rules.depart_after_s)
    c = Courier(pickup=Place(*ORIGIN, radius), rules=rules)
    assert c.run(fixes) == [ARRIVING, ARRIVED]
    assert not c.rejected
    # Arrived exactly when the dwell and the fix count are first both met: not before.
    due = next(
        f for i, f in enumerate(fixes) if i + 1 >= min_fixes and f.ts - fixes[0].ts >= rules.dwell_s
    )
    assert c.emitted[1][0] == due.ts


@settings(max_examples=150, deadline=None)
@given(
    samples=st.lists(st.tuples(st.floats(10, 20), FRACTIONS, BEARINGS), min_size=15, max_size=40),
    where=FRACTIONS,
    kind=st.sampled_from(["inaccurate", "jump", "exit"]),
    far=FRACTIONS,
    bearing=BEARINGS,
    radius=st.floats(30, 80),
    min_fixes=st.integers(2, 3),
)
def test_single_outlier_triggers_nothing(
    samples: list[tuple[float, float, float]],
    where: float,
    kind: str,
    far: float,
    bearing: float,
    radius: float,
    min_fixes: int,
) -> None:
    """One bad fix amid a parked courier's fixes infers nothing the good fixes did not."""
    rules = GeofenceRules(min_fixes=min_fixes)
    base = parked(samples, radius / 3)
    k = 1 + int(where * (len(base) - 2))
    ts = (base[k - 1].ts + base[k].ts) / 2
    if kind == "inaccurate":  # anywhere, with a poor accuracy
        outlier = Fix(ts, *moved(*polar(far * 5000, bearing)), 50.5 + far * 1000)
    elif kind == "jump":  # 5-50 km away within seconds
        outlier = Fix(ts, *moved(*polar(5000 + far * 45_000, bearing)), 5.0)
    else:  # accurate, just past the exit radius
        outlier = Fix(ts, *moved(*polar(2 * radius + 1 + far * 19, bearing)), 5.0)

    # Store statuses are tested from before arrival; departure once it is long due.
    def courier() -> Courier:
        c = Courier(pickup=Place(*ORIGIN, radius), rules=rules)
        if kind == "exit":
            c.status, c.status_at = ARRIVED.value, T0 - 1000
        return c

    without, with_ = courier(), courier()
    without.run(base)
    with_.run([*base[:k], outlier, *base[k:]])
    assert with_.rejected == {"inaccurate": ["inaccurate"], "jump": ["too_fast"]}.get(kind, [])
    assert with_.emitted == without.emitted


@settings(max_examples=50, deadline=None)
@given(
    samples=st.lists(st.tuples(st.floats(10, 20), FRACTIONS, BEARINGS), min_size=20, max_size=40),
    radius=st.floats(30, 100),
)
def test_hovering_at_the_edge_never_departs(
    samples: list[tuple[float, float, float]], radius: float
) -> None:
    """A courier wandering in and out of the store's circle is never reported as leaving."""
    # Noise up to just inside exit_factor x radius: half the fixes fall outside the radius.
    fixes = parked(samples, RULES.exit_factor * radius - 0.5)
    c = Courier(status=ARRIVED.value, status_at=T0 - 1000, pickup=Place(*ORIGIN, radius))
    assert c.run(fixes) == []
    assert not c.rejected


@st.composite
def trips(draw: st.DrawFn) -> list[Fix]:
    """A courier's whole trip: drive to the store, park, drive to the customer, park."""
    speed = draw(st.floats(8, 14))
    gaps = st.floats(8, 15)
    north, east = polar(draw(st.floats(1200, 2500)), draw(BEARINGS))
    fixes: list[Fix] = []
    t = 0.0
    for target, noise_m, least in (((0.0, 0.0), 30.0, 6), ((0.0, 2000.0), 15.0, 9)):
        while True:
            gap = draw(gaps)
            left = math.hypot(target[0] - north, target[1] - east)
            if left <= speed * gap:
                break
            north += (target[0] - north) * speed * gap / left
            east += (target[1] - east) * speed * gap / left
            t += gap
            fixes.append(fix(t, north, east))
        for _ in range(draw(st.integers(least, 20))):
            t += draw(gaps)
            dn, de = polar(draw(FRACTIONS) * noise_m, draw(BEARINGS))
            north, east = target[0] + dn, target[1] + de
            fixes.append(fix(t, north, east))
    return fixes


@settings(max_examples=50, deadline=None)
@given(
    trip=trips(),
    repeats=st.lists(st.integers(1, 3), min_size=1, max_size=20),
    auto=st.booleans(),
)
def test_replayed_and_duplicated_fixes_change_nothing(
    trip: list[Fix], repeats: list[int], auto: bool
) -> None:
    """Fixes delivered twice, or a whole trip replayed, infer nothing more."""
    rules = GeofenceRules(auto_dropoff=auto)
    once = Courier(rules=rules)
    assert once.run(trip) == [ARRIVING, ARRIVED, OUT, *([DROPOFF] if auto else [])]
    assert once.run(trip) == once.statuses  # replayed: nothing new
    assert once.rejected == ["not_newer"] * len(trip)
    dups = [f for i, f in enumerate(trip) for _ in range(repeats[i % len(repeats)])]
    for screened in (True, False):
        twice = Courier(rules=rules, screened=screened)
        twice.run(dups)
        assert twice.emitted == once.emitted


@settings(max_examples=50, deadline=None)
@given(trip=trips(), data=st.data(), screened=st.booleans(), auto=st.booleans())
def test_shuffled_fixes_never_go_backwards(
    trip: list[Fix], data: st.DataObject, screened: bool, auto: bool
) -> None:
    """Fixes arriving in any order never infer a status behind the order's current one."""
    shuffled = data.draw(st.permutations(trip))
    c = Courier(rules=GeofenceRules(auto_dropoff=auto), screened=screened)
    c.run(shuffled)  # `feed` checks each status is ahead of the order's
    ranks = [RANK[s.value] for s in c.statuses]
    assert ranks == sorted(set(ranks))


APP_EVENTS = st.lists(
    st.tuples(
        FRACTIONS,  # where in the trip
        st.sampled_from([*CHAIN, *CHAIN, "cancel"]),
        st.sampled_from(["c-1", "c-1", "c-2"]),  # the bound courier, or another
        st.integers(0, 5),  # event id: repeats are duplicates
    ),
    max_size=8,
)


@settings(max_examples=100, deadline=None)
@given(trip=trips(), events=APP_EVENTS, auto=st.booleans(), know_at=st.booleans())
def test_geofence_and_app_events_push_the_chain_once(
    trip: list[Fix],
    events: list[tuple[float, Status | str, str, int]],
    auto: bool,
    know_at: bool,
) -> None:
    """Inferred and app statuses together push each chain status at most once, in order."""
    rules = GeofenceRules(auto_dropoff=auto)
    items: list[Fix | tuple[float, Status | str, str, int]] = list(trip)
    for e in sorted(events, key=lambda e: -e[0]):
        items.insert(int(e[0] * len(trip)), e)
    order = Order("o-1", NEW, "c-1")
    seen: set[str] = set()
    pushed: list[Status] = []
    track, last, status_at, clock = Track(), None, None, T0

    def apply(event: StatusEvent, at: float) -> Outcome:
        nonlocal order, status_at
        dup = event.event_id in seen
        d = lifecycle.decide(order, event, duplicate=dup, profile=None, received_at=NOW)
        seen.add(event.event_id)
        pushed.extend(p.status for p in d.pushes)
        if d.outcome is Outcome.ACCEPTED:
            order, status_at = d.order, at
        return d.outcome

    for item in items:
        if isinstance(item, Fix):
            clock = item.ts
            if order.state in (DROPOFF.value, CANCELLED) or screen(last, item, rules):
                continue
            last = item
            at = status_at if know_at else None
            track, found = step(track, order.state, at, PICKUP, CUSTOMER, item, rules)
            if found is not None:
                assert RANK[found.value] > RANK[order.state]
                ev = StatusEvent(f"geo:o-1:{found.value}", "o-1", "c-1", found, iso(item.ts))
                assert apply(ev, item.ts) is Outcome.ACCEPTED
        elif item[1] == "cancel":
            with contextlib.suppress(InputError):  # refused after dropoff, as the CLI does
                order = lifecycle.cancel(order, "o-1")
        else:
            _, status, courier, n = item
            apply(StatusEvent(f"app:{n}", "o-1", courier, Status(status), iso(clock)), clock)
    assert pushed == list(CHAIN[: len(pushed)])

"""`courierd replay` and `courierd stores suggest` (CONTRACT.md 13): the live ingest path
(planner + writer + a real SQLite store) against replay over what it stored, the pickup
point learned from couriers' stays, and the commands' hostile arguments."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from courierd.commands.replay import rules_with
from courierd.config import GeofenceSettings, StoreSettings
from courierd.domain.geofence import GeofenceRules
from courierd.domain.model import (
    Assignment,
    Input,
    LocationFix,
    Place,
    Status,
    StatusEvent,
    iso,
)
from courierd.domain.pickup import suggest
from courierd.domain.replay import replay
from courierd.errors import InputError
from courierd.store import Store, open_store
from courierd.store.replays import ReplayReads
from tests.conftest import Cli, open_path

STORE = (40.7000, -74.0000)
HOME = (40.7200, -74.0300)
T0 = 1_780_000_000.0


def moved(point: tuple[float, float], north_m: float, east_m: float) -> tuple[float, float]:
    lat, lng = point
    return lat + north_m / 111_320, lng + east_m / (111_320 * math.cos(math.radians(lat)))


def polar(point: tuple[float, float], dist_m: float, bearing: float) -> tuple[float, float]:
    return moved(point, dist_m * math.cos(bearing), dist_m * math.sin(bearing))


def memory_store() -> Store:
    return open_store(StoreSettings(path=Path(":memory:")))


def replayed(store: Store, rules: GeofenceRules) -> dict[str, dict[str, tuple[str | None, ...]]]:
    """Per order, per status: (was, would_be)."""
    reads = ReplayReads(store.db)
    out: dict[str, dict[str, tuple[str | None, ...]]] = {}
    for history in reads.histories(reads.order_ids()):
        result = replay(history, rules)
        out[result.order_id] = {s.status.value: (s.was, s.would_be) for s in result.statuses}
    return out


# -- the live path and replay agree ---------------------------------------------------


@st.composite
def rule_sets(draw: st.DrawFn) -> GeofenceRules:
    return GeofenceRules(
        approach_m=draw(st.sampled_from([150.0, 500.0, 1000.0])),
        radius_m=draw(st.sampled_from([40.0, 100.0])),
        dwell_s=draw(st.sampled_from([0.0, 20.0, 60.0])),
        min_fixes=draw(st.integers(1, 3)),
        depart_after_s=draw(st.sampled_from([0.0, 30.0, 90.0])),
        exit_factor=draw(st.sampled_from([1.0, 2.0])),
        auto_dropoff=draw(st.booleans()),
    )


# Where a fix is taken, as a distance from the order's pickup: mostly near it.
_DISTANCES = st.one_of(st.floats(0, 60), st.floats(60, 300), st.floats(300, 2500))


@st.composite
def deliveries(draw: st.DrawFn) -> list[Input]:
    """One or two orders of courier c1 (maybe handed to c2 half way, and maybe back to
    c1, while c1's fixes serve the other order), app statuses at random places, and
    noisy fixes of both couriers: near the pickup, away, glitches (inaccurate, jumps),
    repeats."""
    orders = ["o1", "o2"][: draw(st.integers(1, 2))]
    pickups = {"o1": STORE, "o2": moved(STORE, 0, 400)}
    inputs: list[Input] = [
        Assignment(
            oid,
            "c1",
            pickup=Place(*pickups[oid], draw(st.sampled_from([None, 60.0]))),
            dropoff=Place(*HOME),
        )
        for oid in orders
    ]
    t = T0
    senders = draw(st.sampled_from([["c1", "c1", "c1", "c2"], ["c1"]]))  # c2 may be silent
    for _ in range(draw(st.integers(5, 45))):
        t += draw(st.sampled_from([1.0, 5.0, 10.0, 15.0, 40.0]))
        courier = draw(st.sampled_from(senders))
        if draw(st.integers(0, 9)) == 0:
            lat, lng = HOME if draw(st.booleans()) else polar(STORE, 5000, 1.0)
        else:
            lat, lng = polar(STORE, draw(_DISTANCES), draw(st.floats(0, 2 * math.pi)))
        accuracy = draw(st.sampled_from([5.0, 5.0, 20.0, 120.0, None]))
        fix_t = t - draw(st.sampled_from([0.0, 0.0, 0.0, 30.0]))  # some arrive late
        inputs.append(LocationFix(courier, iso(fix_t), lat, lng, accuracy))
        roll = draw(st.integers(0, 19))
        oid = draw(st.sampled_from(orders))
        if roll == 0:
            status = draw(st.sampled_from(list(Status)))
            ts = draw(st.sampled_from([iso(t), None]))
            inputs.append(StatusEvent(f"e{len(inputs)}", oid, "c1", status, ts))
        elif roll in (1, 2, 3):  # to c2, or back to c1 (maybe with no fix of c2 between)
            inputs.append(Assignment(oid, draw(st.sampled_from(["c1", "c2"]))))
    return inputs


@given(deliveries(), rule_sets(), st.lists(st.integers(1, 8), max_size=12))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_replay_gives_back_what_the_live_path_decided(
    inputs: list[Input], rules: GeofenceRules, cuts: list[int]
) -> None:
    """Random noisy deliveries through the real planner, writer and store, in random
    batches: replay with the same settings gives each geofence status at the same time."""
    store = memory_store()
    store.writer.geofence_rules = rules
    try:
        i, now = 0, T0 + 10_000
        for size in [*cuts, len(inputs)]:
            if i < len(inputs):
                store.writer.commit(inputs[i : i + size], now=now)
                i, now = i + size, now + 1
        got = replayed(store, rules)
        fired = store.db.value("SELECT count(*) FROM transitions WHERE source = 'geofence'")
        event(f"geofence statuses fired live: {min(fired, 4)}")
        assert sum(len(v) for v in got.values()) == fired
        for oid, statuses in got.items():
            for status, (was, would_be) in statuses.items():
                assert was == would_be, (oid, status)
    finally:
        store.close()


def test_a_new_courier_starts_the_rules_over_in_replay_too() -> None:
    """Handed to another courier half way through the dwell: the new courier's own dwell
    counts, live and in replay alike."""
    store = memory_store()
    try:
        inputs: list[Input] = [Assignment("o1", "c1", pickup=Place(*STORE))]
        inputs += [LocationFix("c1", iso(T0 + t), *STORE, 5.0) for t in (0, 10, 20)]
        inputs.append(Assignment("o1", "c2"))
        inputs += [LocationFix("c2", iso(T0 + t), *STORE, 5.0) for t in (25, 35, 45, 55, 65)]
        store.writer.commit(inputs, now=T0 + 5000)
        got = replayed(store, GeofenceRules())
    finally:
        store.close()
    assert got["o1"]["arrived_at_store"] == (iso(T0 + 55), iso(T0 + 55))


def test_handed_back_to_the_first_courier_starts_over_in_replay_too() -> None:
    """o1 goes c1 → c2 → c1 with no fix of c2 between, while c1's fixes serve o2 inside
    o1's store: live, o1's rules start over on each rebind, so those fixes are not o1's;
    replay must not read them as o1's either (arrived_at_store would fire 30 s early)."""
    store = memory_store()
    try:
        inputs: list[Input] = [
            Assignment("o1", "c1", pickup=Place(*STORE)),
            Assignment("o2", "c1", pickup=Place(*STORE)),
        ]
        inputs += [LocationFix("c1", iso(T0 + t), *moved(STORE, 200, 0), 5.0) for t in (0, 10)]
        inputs.append(Assignment("o1", "c2"))
        inputs += [LocationFix("c1", iso(T0 + t), *STORE, 5.0) for t in (20, 30, 40)]
        inputs.append(Assignment("o1", "c1"))
        inputs += [LocationFix("c1", iso(T0 + t), *STORE, 5.0) for t in (50, 60, 70, 80, 90)]
        store.writer.commit(inputs, now=T0 + 5000)
        got = replayed(store, GeofenceRules())
    finally:
        store.close()
    assert got["o2"]["arrived_at_store"] == (iso(T0 + 50), iso(T0 + 50))
    assert got["o1"]["arrived_at_store"] == (iso(T0 + 80), iso(T0 + 80))


def a_delivery(t0: float, wait_at: tuple[float, float] = STORE) -> list[tuple[float, float, float]]:
    """Approach from 3 km, wait 3 minutes at `wait_at`, leave east: (ts, lat, lng)."""
    route = [(t0 + i * 10, *moved(STORE, 3000 - i * 200, 0)) for i in range(15)]
    t = route[-1][0]
    route += [(t + 10 * (i + 1), *moved(wait_at, (i % 3) * 5, 0)) for i in range(18)]
    t = route[-1][0]
    route += [(t + 10 * (i + 1), *moved(STORE, 0, 100 * (i + 1))) for i in range(10)]
    return route


def test_a_smaller_approach_moves_only_arriving_later() -> None:
    """approach_m 1000 → 300: arriving_at_store fires later; arrival and departure keep
    their times."""
    store = memory_store()
    try:
        inputs: list[Input] = [
            Assignment("o1", "c1", pickup=Place(*STORE)),
            StatusEvent("e1", "o1", "c1", Status.DASHER_CONFIRMED, iso(T0)),
        ]
        inputs += [LocationFix("c1", iso(t), y, x, 5.0) for t, y, x in a_delivery(T0)]
        store.writer.commit(inputs, now=T0 + 5000)
        live = GeofenceRules()
        tuned = GeofenceRules(approach_m=300.0)
        (history,) = ReplayReads(store.db).histories(["o1"])
        same = {s.status: s for s in replay(history, live).statuses}
        result = {s.status: s for s in replay(history, tuned).statuses}
    finally:
        store.close()
    assert all(s.shift_s == 0 for s in same.values()) and len(same) == 3
    assert result[Status.ARRIVING_AT_STORE].shift_s == 40.0  # 1000 m → 200 m from the store
    assert result[Status.ARRIVED_AT_STORE].shift_s == 0
    assert result[Status.DASHER_OUT_FOR_DELIVERY].shift_s == 0


# -- the learned pickup point ----------------------------------------------------------


def test_suggest_finds_where_couriers_wait_through_noise_and_multipath(tmp_path: Path) -> None:
    """Couriers wait 60 m east of the registered point, with 8 m noise and one multipath
    fix 300 m off: the suggestion is within 25 m of where they wait, its radius holds
    their stays, and `--csv` loads straight back through `stores import`."""
    import random

    rng = random.Random(7)
    wait_at = moved(STORE, 0, 60)
    db = tmp_path / "courierd.db"
    store = open_path(db)
    try:
        store.registry.import_stores([("s1", Place(*STORE, 100.0))], T0)
        for n in range(6):
            oid, t0 = f"o{n}", T0 + n * 3600
            store.db.execute(
                "INSERT INTO orders (order_id, state, updated_at, store_id) "
                "VALUES (?, 'new', ?, 's1')",
                (oid, iso(t0)),
            )
            inputs: list[Input] = [
                Assignment(oid, f"c{n}"),
                StatusEvent(f"e{n}", oid, f"c{n}", Status.DASHER_CONFIRMED, iso(t0)),
            ]
            for t, y, x in a_delivery(t0, wait_at):
                y, x = polar((y, x), abs(rng.gauss(0, 8)), rng.uniform(0, 2 * math.pi))
                inputs.append(LocationFix(f"c{n}", iso(t), y, x, 8.0))
            if n == 0:  # one multipath fix in the middle of a stay
                t, _, _ = a_delivery(t0, wait_at)[24]
                inputs.append(LocationFix("c0", iso(t + 5), *moved(wait_at, 300, 0), 10.0))
            store.writer.commit(inputs, now=t0 + 2000)
        visits = ReplayReads(store.db).visits()
    finally:
        store.close()
    registered, stays = visits["s1"]
    assert len(stays) == 6
    found = suggest("s1", registered, [v.points for v in stays])
    assert found is not None
    off = math.dist(moved(wait_at, 0, 0), (found.lat, found.lng)) * 111_320
    assert off < 25, off
    assert 40 <= found.moved_m <= 80 and found.visits == 6
    assert 15 <= found.radius_m <= 40


def test_the_median_ignores_a_multipath_fix_a_mean_would_follow() -> None:
    """A stay of 20 fixes at one point and one 2 km off in the middle: the centre stays
    on the point (a mean would move 95 m), the radius leaves the outlier out."""
    point = moved(STORE, 0, 60)
    stay = [point] * 10 + [moved(point, 2000, 0)] + [point] * 10
    found = suggest("s1", Place(*STORE), [stay])
    assert found is not None
    assert math.dist(point, (found.lat, found.lng)) * 111_320 < 1
    assert found.radius_m == 15  # the outlier is outside what the radius holds


# -- hostile arguments -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("pair", "needle"),
    [
        ("geofence.nope=1", "KEY one of"),
        ("radius_m=5", "KEY one of"),
        ("geofence.radius_m", "KEY one of"),
        ("store.path=/tmp/x", "KEY one of"),
        ("geofence.radius_m=nan", "geofence.radius_m"),
        ("geofence.dwell_s=inf", "geofence.dwell_s"),
        ("geofence.min_fixes=1.5", "geofence.min_fixes"),
        ("geofence.exit_factor=0.5", "geofence.exit_factor"),
        ("geofence.enabled=false", "cannot turn them off"),
    ],
)
def test_bad_overrides_are_named(pair: str, needle: str) -> None:
    """Unknown keys, non-finite or out-of-range values: InputError naming the key."""
    with pytest.raises(InputError, match=needle):
        rules_with(GeofenceSettings(), [pair])


@given(st.text(max_size=60))
def test_any_override_is_rules_or_a_clear_error(value: str) -> None:
    """Whatever follows `geofence.radius_m=`: finite positive rules, or InputError."""
    try:
        rules, _ = rules_with(GeofenceSettings(), [f"geofence.radius_m={value}"])
    except InputError as e:
        assert "\n" not in str(e)
    else:
        assert math.isfinite(rules.radius_m) and rules.radius_m > 0


@pytest.mark.parametrize(
    "args",
    [
        ["replay", "--since", "2026-02-30T00:00:00Z"],
        ["replay", "--since", "0001-01-01T00:00:00+23:59"],
        ["replay", "--until", "9999-12-31T23:59:59-23:59"],
        ["replay", "--set", "geofence.nope=1"],
        ["replay", "--set", "geofence.approach_m=NaN"],
        ["replay", "--order", "no-such-order"],
    ],
)
def test_hostile_arguments_exit_2_with_one_line(cli: Cli, db_path: Path, args: list[str]) -> None:
    """Dates out of range, unknown keys, NaN, unknown orders: one line on stderr, exit 2."""
    open_path(db_path).close()
    r = cli(*args)
    assert r.code == 2, (r.code, r.err)
    assert r.out == ""
    assert len(r.err.strip().splitlines()) == 1 and r.err.startswith("courierd: ")


def test_suggest_csv_round_trips_through_stores_import(
    cli: Cli, tmp_path: Path, db_path: Path
) -> None:
    """`stores suggest --csv` is a file `stores import` takes as it is."""
    store = open_path(db_path)
    try:
        store.registry.import_stores([("s1", Place(*STORE))], T0)
        for n in range(3):
            oid = f"o{n}"
            store.db.execute(
                "INSERT INTO orders (order_id, state, updated_at, store_id) "
                "VALUES (?, 'new', ?, 's1')",
                (oid, iso(T0)),
            )
            inputs: list[Input] = [Assignment(oid, f"c{n}")]
            inputs += [
                LocationFix(f"c{n}", iso(t), y, x, 5.0)
                for t, y, x in a_delivery(T0 + n * 3600, moved(STORE, 40, 0))
            ]
            store.writer.commit(inputs, now=T0 + n * 3600 + 2000)
    finally:
        store.close()
    suggested = cli("stores", "suggest", "--csv")
    assert suggested.code == 0, suggested.err
    rows = list(csv.reader(io.StringIO(suggested.out)))
    assert rows[0] == ["merchant_supplied_id", "lat", "lng", "radius_m"] and len(rows) == 2
    assert 30 <= math.dist(STORE, (float(rows[1][1]), float(rows[1][2]))) * 111_320 <= 50
    (tmp_path / "suggested.csv").write_text(suggested.out)
    imported = cli("stores", "import", "suggested.csv")
    assert imported.code == 0, imported.err
    listed = json.loads(cli("stores", "list", "--json").out)
    assert [(s["merchant_supplied_id"], s["lat"], s["lng"], s["radius_m"]) for s in listed] == [
        (rows[1][0], float(rows[1][1]), float(rows[1][2]), float(rows[1][3]))
    ]
    as_json = json.loads(cli("stores", "suggest", "--json").out)
    assert as_json["stores"][0]["visits"] == 3
    assert as_json["stores"][0]["moved_m"] < 1  # the registry now holds the suggestion


def test_a_read_only_postgresql_store_never_migrates_nor_writes(cli: Cli) -> None:
    """Opened read-only (replay, stores suggest, the API's reads), a PostgreSQL database
    one version behind is an error telling to upgrade the daemon first, left as it was;
    once the daemon's open migrated it, the read-only sessions refuse any write."""
    from tests import pg

    if (why := pg.available()) is not None:
        pytest.skip(why)

    from courierd.errors import StoreError
    from courierd.store.postgres import PostgresDatabase
    from courierd.store.schema import POSTGRES_MIGRATIONS

    latest = len(POSTGRES_MIGRATIONS)
    with pg.database(from_template=False) as url:
        PostgresDatabase(url, migrations=POSTGRES_MIGRATIONS[:-1]).close()  # one behind
        with pytest.raises(StoreError, match="upgrade the daemon first"):
            open_store(StoreSettings(url=url), readonly=True)
        r = cli("replay", "--json", env={"COURIERD_STORE__URL": url})
        assert r.code != 0 and "upgrade the daemon first" in r.err, (r.code, r.err)
        behind = PostgresDatabase(url, migrate=False)
        try:
            assert behind.schema_version == latest - 1  # nothing migrated
        finally:
            behind.close()
        open_store(StoreSettings(url=url)).close()  # as the daemon opens it: migrates
        with open_store(StoreSettings(url=url), readonly=True) as store:
            assert ReplayReads(store.db).order_ids() == []
            with pytest.raises(StoreError, match="opened read-only"):
                store.db.execute("CREATE TABLE written (a integer)")

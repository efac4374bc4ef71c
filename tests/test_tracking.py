"""Fixes drive orders through the chain, on a real store (CONTRACT.md 7 and 9): places and
their precedence, filters, geofence statuses through `decide`, redelivery after a crash,
last wills and the offline watchdog."""

from __future__ import annotations

import json
import math
from pathlib import Path

from courierd.domain.lifecycle import active_sql
from courierd.domain.model import (
    Assignment,
    CourierOffline,
    LocationFix,
    Place,
    Status,
    StatusEvent,
    iso,
)
from courierd.domain.order_schema import OrderFacts
from courierd.domain.telemetry import parse
from courierd.store import Store
from tests.conftest import Cli

T0 = 1_700_000_000.0
STORE = (40.7000, -74.0000)
HOME = (40.7200, -74.0300)


def moved(point: tuple[float, float], north_m: float, east_m: float) -> tuple[float, float]:
    lat, lng = point
    return (
        lat + north_m / 111_320,
        lng + east_m / (111_320 * math.cos(math.radians(lat))),
    )


def fix(t: float, at: tuple[float, float], courier: str = "c1", acc: float = 5.0) -> LocationFix:
    return LocationFix(courier, iso(t), at[0], at[1], acc, 8.0)


def assign(order: str = "o1", courier: str = "c1", pickup: bool = True) -> Assignment:
    return Assignment(
        order, courier, b"", Place(*STORE, 80) if pickup else None, Place(*HOME, None)
    )


def statuses_pushed(store: Store, order: str = "o1") -> list[tuple[str, str]]:
    return [
        (s, src)
        for s, src in store.db.rows(
            "SELECT status, source FROM outbox WHERE order_id = ? ORDER BY id", (order,)
        )
    ]


def drive(store: Store, route: list[tuple[float, tuple[float, float]]], courier: str = "c1"):  # type: ignore[no-untyped-def]
    """Commit fixes one batch each, as they would arrive; the clock follows the fixes."""
    for t, at in route:
        store.writer.commit([fix(t, at, courier)], now=t + 1)


def a_delivery() -> list[tuple[float, tuple[float, float]]]:
    """Approach the store, wait 3 minutes at it, leave for the customer."""
    route = [(T0 + i * 10, moved(STORE, 3000 - i * 200, 0)) for i in range(15)]  # 3 km → 200 m
    t = route[-1][0]
    route += [(t + 10 * (i + 1), moved(STORE, (i % 3) * 5, 0)) for i in range(18)]  # parked
    t = route[-1][0]
    route += [(t + 10 * (i + 1), moved(STORE, 0, 100 * (i + 1))) for i in range(10)]  # away
    return route


def test_a_phone_that_only_sends_positions_moves_its_order(store: Store) -> None:
    """Dispatch gives the places; the app says only dasher_confirmed; the fixes do the rest:
    arriving, arrived and out for delivery, once each, in order, marked geofence."""
    store.writer.commit(
        [assign(), StatusEvent("e1", "o1", "c1", Status.DASHER_CONFIRMED, iso(T0))], now=T0
    )
    drive(store, a_delivery())
    assert statuses_pushed(store) == [
        ("dasher_confirmed", "app"),
        ("arriving_at_store", "geofence"),
        ("arrived_at_store", "geofence"),
        ("dasher_out_for_delivery", "geofence"),
    ]
    view = store.queries.order_view("o1")
    assert view is not None and view["state"] == "dasher_out_for_delivery"
    geo = [t for t in view["transitions"] if t["source"] == "geofence"]
    assert [t["event_id"] for t in geo] == [
        "geo:o1:arriving_at_store",
        "geo:o1:arrived_at_store",
        "geo:o1:dasher_out_for_delivery",
    ]
    assert all("lat" in t and "lng" in t for t in geo)  # where each one fired
    first_near = next(t for t, at in a_delivery() if _dist(at, STORE) <= 1000)
    assert geo[0]["at"] == iso(first_near)  # the fix's own time, not the clock
    assert view["eta"]["to"] == "dropoff" and view["eta"]["distance_m"] > 0


def _dist(a: tuple[float, float], b: tuple[float, float]) -> float:
    from courierd.domain.geo import distance_m

    return distance_m(a[0], a[1], b[0], b[1])


def test_a_redelivered_fix_never_makes_a_second_transition(store: Store) -> None:
    """After a crash the broker sends fixes again: nothing new is recorded or pushed."""
    store.writer.commit([assign()], now=T0)
    route = a_delivery()
    drive(store, route)
    before = store.db.value("SELECT count(*) FROM transitions")
    drive(store, route)  # all of it again
    assert store.db.value("SELECT count(*) FROM transitions") == before
    assert len(statuses_pushed(store)) == 4  # dasher_confirmed filled, then three


def test_inaccurate_fixes_and_jumps_are_ignored_and_counted(store: Store) -> None:
    """A fix with poor accuracy or an impossible jump neither moves the courier nor the
    order; the reason is counted."""
    store.writer.commit([assign(), fix(T0, moved(STORE, 5000, 0))], now=T0)
    fx = store.writer.commit(
        [
            fix(T0 + 10, STORE, acc=200),  # inaccurate, right at the store
            fix(T0 + 20, moved(STORE, 0, 0)),  # 5 km in 10 s: a jump
            fix(T0 - 5, moved(STORE, 4990, 0)),  # older than the last accepted one
        ],
        now=T0 + 21,
    )
    counts = fx.counts
    assert (counts["fix_inaccurate"], counts["fix_too_fast"], counts["fix_not_newer"]) == (1, 1, 1)
    assert statuses_pushed(store) == []  # still 5 km out: nothing inferred
    where = store.db.row("SELECT lat FROM couriers WHERE courier_id = 'c1'")
    assert where is not None and abs(where[0] - moved(STORE, 5000, 0)[0]) < 1e-9


def test_places_follow_the_contracts_precedence(store: Store) -> None:
    """Pickup: the assignment's, else the store registry's by the order's store id.
    Dropoff: the assignment's, else the submitted order's delivery address."""
    store.registry.import_stores([("s-9", Place(40.71, -74.01, 60))], now=T0)
    store.registry.record_order(OrderFacts("o2", "s-9", (40.73, -74.03)), now=T0)
    assert store.queries.places("o2") == (Place(40.71, -74.01, 60), Place(40.73, -74.03, None))
    store.writer.commit(
        [Assignment("o2", "c1", b"", Place(40.5, -74.5, 90), None)], now=T0
    )  # dispatch knows better
    assert store.queries.places("o2") == (Place(40.5, -74.5, 90), Place(40.73, -74.03, None))


def test_orders_of_other_couriers_or_without_places_are_not_evaluated(store: Store) -> None:
    """Only the bound courier's fixes count, and only for orders that have places."""
    store.writer.commit([assign("o1", "c1"), assign("o2", "c2", pickup=False)], now=T0)
    drive(store, a_delivery(), courier="c2")  # c2 at o1's store: not o1's courier
    assert statuses_pushed(store, "o1") == []
    assert statuses_pushed(store, "o2") == []  # o2 has no pickup: no approach, no arrival


def test_cancelled_orders_are_not_moved_by_fixes(store: Store) -> None:
    """A cancelled order is finished: its courier's fixes change nothing."""
    store.writer.commit([assign()], now=T0)
    store.outbox.hold_for_cancel("o1", T0, 60)
    store.outbox.finish_cancel("o1", T0)
    drive(store, a_delivery())
    assert statuses_pushed(store) == []
    assert store.db.value("SELECT state FROM orders WHERE order_id = 'o1'") == "cancelled"


def alerts(store: Store) -> list[dict[str, object]]:
    return [json.loads(n.payload) for n in store.notices.due(100)]


def test_a_last_will_reports_the_courier_at_once_and_the_next_fix_brings_it_back(
    store: Store,
) -> None:
    """couriers/{id}/lwt (or OwnTracks' lwt): one courier_offline alert with its active
    orders; the next valid message: one courier_back. A second will changes nothing."""
    store.writer.commit([assign(), fix(T0, moved(STORE, 3000, 0))], now=T0)
    store.writer.commit([CourierOffline("c1"), CourierOffline("c1")], now=T0 + 60)
    store.writer.commit([fix(T0 + 70, moved(STORE, 2900, 0))], now=T0 + 70)
    got = alerts(store)
    assert [(a["type"], a["order_ids"]) for a in got] == [
        ("courier_offline", ["o1"]),
        ("courier_back", ["o1"]),
    ]
    assert got[0]["last_seen"] == iso(T0) and got[0]["at"] == iso(T0 + 60)
    assert all(n.topic == "dispatch/alerts" for n in store.notices.due(10))


def test_a_last_will_of_a_courier_without_work_is_not_an_alert(store: Store) -> None:
    """Offline matters only for couriers with active orders."""
    store.writer.commit([fix(T0, STORE, courier="idle"), CourierOffline("idle")], now=T0)
    assert alerts(store) == []


def test_the_watchdog_reports_each_silence_once(store: Store) -> None:
    """Silent for offline_after_s by the clock: one alert, however many checks; a courier
    without active orders, or never heard from, is not reported."""
    store.writer.commit(
        [assign("o1", "c1"), fix(T0, STORE, "c1"), fix(T0, STORE, "idle"), assign("o3", "never")],
        now=T0,
    )
    assert store.notices.report_silent(T0 + 299, 300) == []
    assert store.notices.report_silent(T0 + 301, 300) == ["c1"]
    assert store.notices.report_silent(T0 + 400, 300) == []
    assert store.notices.offline_count() == 1
    store.writer.commit([fix(T0 + 500, STORE, "c1")], now=T0 + 500)
    assert [a["type"] for a in alerts(store)] == ["courier_offline", "courier_back"]
    assert store.notices.offline_count() == 0


def test_owntracks_booklet_examples_parse() -> None:
    """The booklet's location and lwt payloads become a fix and a last will; waypoints
    and transitions are valid OwnTracks, ignored; a location without position is not."""
    now = 1_700_000_100.0
    location = {
        "_type": "location",
        "acc": 13,
        "alt": 27,
        "batt": 92,
        "conn": "w",
        "lat": 48.856826,
        "lon": 2.292713,
        "tid": "JJ",
        "tst": 1_700_000_000,
        "vel": 36,
        "cog": 270,
    }
    got = parse("owntracks/jane/phone", json.dumps(location).encode(), now=now)
    assert got == LocationFix("jane", iso(1_700_000_000), 48.856826, 2.292713, 13, 10.0, 270)
    tid = parse("owntracks/jane/phone", json.dumps(location).encode(), now=now, owntracks="tid")
    assert isinstance(tid, LocationFix) and tid.courier_id == "JJ"
    device = parse("owntracks/jane/phone", b'{"_type":"lwt","tst":1}', now=now, owntracks="device")
    assert device == CourierOffline("phone")
    for kind in ("transition", "waypoint", "waypoints", "card", "cmd", "status", "encrypted"):
        ignored = parse("owntracks/jane/phone/event", json.dumps({"_type": kind}).encode(), now=now)
        assert type(ignored).__name__ == "Ignored", (kind, ignored)
    bad = parse("owntracks/jane/phone", b'{"_type":"location","tst":1}', now=now)
    assert type(bad).__name__ == "DeadLetter" and bad.reason == "missing_field"  # type: ignore[union-attr]
    off = parse("owntracks/jane/phone", json.dumps(location).encode(), now=now, owntracks=None)
    assert type(off).__name__ == "Ignored"


def test_the_active_orders_lookup_uses_its_partial_index(sqlite_store: Store) -> None:
    """Finding a courier's active orders on every fix is an index lookup, not a scan."""
    store = sqlite_store
    plan = [
        r[3]
        for r in store.db.rows(
            "EXPLAIN QUERY PLAN SELECT order_id FROM orders AS o WHERE "
            f"(o.courier_id IN (?, ?) AND {active_sql('o.state')})",  # the writer's
            ("c1", "c2"),
        )
    ]
    assert any("USING INDEX orders_active" in step for step in plan), plan


def test_stores_import_is_all_or_nothing(cli: Cli, tmp_path: Path) -> None:
    """`stores import` loads a CSV; a bad line imports nothing and names the line."""
    good = tmp_path / "stores.csv"
    good.write_text("merchant_supplied_id,lat,lng,radius_m\ns-1,40.7,-74.0,80\ns-2,40.8,-74.1,\n")
    r = cli("stores", "import", str(good))
    assert r.code == 0 and json.loads(r.out) == {"imported": 2}, r.err
    listed = json.loads(cli("stores", "list", "--json").out)
    assert [(s["merchant_supplied_id"], s["radius_m"]) for s in listed] == [
        ("s-1", 80.0),
        ("s-2", None),
    ]
    bad = tmp_path / "bad.csv"
    bad.write_text("merchant_supplied_id,lat,lng,radius_m\ns-3,40.7,-74.0,80\ns-4,95,-74.0,80\n")
    r = cli("stores", "import", str(bad))
    assert r.code == 2 and "line 3" in r.err and "lat" in r.err
    assert len(json.loads(cli("stores", "list", "--json").out)) == 2  # s-3 not imported
    r = cli("stores", "import", str(tmp_path / "missing.csv"))
    assert r.code == 2 and "cannot read" in r.err

"""`courierd simulate` as courierd (or someone watching the broker) would see it.

Pure: a fake `publish` records every message with the moment it went out, and a fake
clock, moved on by the run's own waits, stands in for time; no broker, no daemon. The
noisy runs are replayed through courierd's own parser and geofence rules, the way the
daemon reads them.
"""

from __future__ import annotations

import json
import math
import threading
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from itertools import pairwise
from typing import Any

from courierd.devtools.sandbox import Sandbox
from courierd.devtools.simulate import Mode, Noise, Simulation
from courierd.domain import geofence
from courierd.domain.geo import distance_m
from courierd.domain.lifecycle import CHAIN
from courierd.domain.model import Assignment, Input, LocationFix, Place, StatusEvent
from courierd.domain.telemetry import parse

EPOCH = 1_700_000_000.0  # unix time of the telemetry couriers' simulated second 0
WALL = EPOCH + 30 * 86400.0  # the fake wall clock at the start: far ahead, nothing paces
SPEED = 600.0
ALL_NOISE = Noise(duplicates=0.05, reorder=0.05, offline=0.005, junk=0.02, glitches=0.05)
CONFIRMED, DROPOFF = CHAIN[0].value, CHAIN[-1].value


class FakeTime(threading.Event):
    """The run's stop event, whose `wait` moves a fake clock on instead of sleeping."""

    def __init__(self, wall: float) -> None:
        super().__init__()
        self.elapsed = 0.0
        self.wall0 = wall

    def clock(self) -> float:
        return self.elapsed

    def wall(self) -> float:
        return self.wall0 + self.elapsed

    def wait(self, timeout: float | None = None) -> bool:
        self.elapsed += timeout or 0.0
        return self.is_set()


@dataclass(frozen=True)
class Message:
    """One published message, and the (fake) unix time it went out."""

    topic: str
    payload: bytes
    retain: bool
    sent_at: float

    @property
    def parsed(self) -> Input:
        """What courierd makes of it."""
        return parse(self.topic, self.payload, now=self.sent_at)


@dataclass(frozen=True)
class Run:
    """Everything a simulation published, and the simulation itself."""

    messages: list[Message]
    sim: Simulation

    def inputs(self) -> Iterator[tuple[Message, Input]]:
        for m in self.messages:
            yield m, m.parsed

    def assignments(self) -> dict[str, list[dict[str, Any]]]:
        """Assignment documents by order id."""
        found: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for m in self.messages:
            if m.topic == "dispatch/assignments":
                doc = json.loads(m.payload)
                found[doc["order_id"]].append(doc)
        return found

    def statuses(self) -> dict[str, list[tuple[Message, StatusEvent]]]:
        """Valid status events by order, in publication order, each event id once."""
        seen: set[str] = set()
        found: dict[str, list[tuple[Message, StatusEvent]]] = defaultdict(list)
        for m, parsed in self.inputs():
            if isinstance(parsed, StatusEvent) and parsed.event_id not in seen:
                seen.add(parsed.event_id)
                found[parsed.order_id].append((m, parsed))
        return found

    def fixes(self) -> dict[str, list[tuple[Message, LocationFix]]]:
        """Valid location fixes by courier, in publication order."""
        found: dict[str, list[tuple[Message, LocationFix]]] = defaultdict(list)
        for m, parsed in self.inputs():
            if isinstance(parsed, LocationFix):
                found[parsed.courier_id].append((m, parsed))
        return found


def simulate(
    mode: Mode,
    *,
    couriers: int = 4,
    orders: int = 8,
    noise: Noise | None = None,
    seed: int = 7,
    wall: float = WALL,
    speed: float = SPEED,
) -> Run:
    fake = FakeTime(wall)
    messages: list[Message] = []
    sim = Simulation(
        lambda t, p, r: messages.append(Message(t, p, r, fake.wall())),
        couriers=couriers,
        speed=speed,
        orders=orders,
        noise=noise,
        seed=seed,
        mode=mode,
        epoch=EPOCH,
        clock=fake.clock,
        wall=fake.wall,
    )
    sim.run(fake)
    return Run(messages, sim)


def unix(ts: str) -> float:
    return datetime.fromisoformat(ts).timestamp()


def metres(a: LocationFix | Place, b: LocationFix | Place) -> float:
    return distance_m(a.lat, a.lng, b.lat, b.lng)


def place(doc: dict[str, Any]) -> Place:
    return Place(doc["lat"], doc["lng"], doc.get("radius_m"))


def trips(run: Run) -> Iterator[tuple[dict[str, Any], float, float, list[LocationFix]]]:
    """Each telemetry order: its assignment, confirm and dropoff ts, and the fixes between."""
    fixes = run.fixes()
    for order_id, events in run.statuses().items():
        assignment = run.assignments()[order_id][0]
        start, end = unix(events[0][1].ts or ""), unix(events[-1][1].ts or "")
        between = [f for _, f in fixes[assignment["courier_id"]] if start <= unix(f.ts) <= end]
        yield assignment, start, end, between


def test_status_mode_walks_the_whole_chain() -> None:
    """Status mode is unchanged: every order's app statuses walk the chain; no assignments."""
    run = simulate("status", couriers=3, orders=6)
    per_order = {o: [e.status.value for _, e in evs] for o, evs in run.statuses().items()}
    assert len(per_order) == 6 and run.sim.orders_done == 6
    assert all(s == [c.value for c in CHAIN] for s in per_order.values())
    assert not run.assignments() and run.sim.sent["assignment"] == 0
    assert run.sim.kinds() == {"status": 3, "telemetry": 0}


def test_each_telemetry_order_gets_one_assignment_with_its_places() -> None:
    """Each telemetry order is assigned once: a store a few km off, a customer 1-4 km on."""
    run = simulate("telemetry")
    assignments = run.assignments()
    assert len(assignments) == 8 and all(len(a) == 1 for a in assignments.values())
    assert run.sim.sent["assignment"] == 8 and run.sim.orders_done == 8
    for doc, _, _, fixes in trips(run):
        pickup, dropoff = place(doc["pickup"]), place(doc["dropoff"])
        assert pickup.radius_m is not None and 80 <= pickup.radius_m <= 120
        assert 990 <= metres(pickup, dropoff) <= 4040
        assert 1500 <= metres(fixes[0], pickup) <= 5500  # where the courier set off from


def test_telemetry_courier_app_sends_only_confirmed_then_dropoff() -> None:
    """A telemetry courier's app sends dasher_confirmed after the assignment, then dropoff only."""
    for noise in (None, ALL_NOISE):
        run = simulate("telemetry", noise=noise)
        assignments = run.assignments()
        assigned_at = {
            json.loads(m.payload)["order_id"]: m.sent_at
            for m in run.messages
            if m.topic == "dispatch/assignments"
        }
        for order_id, events in run.statuses().items():
            assert [e.status.value for _, e in events] == [CONFIRMED, DROPOFF]
            assert {e.courier_id for _, e in events} == {assignments[order_id][0]["courier_id"]}
            assert events[0][0].sent_at > assigned_at[order_id]


def test_telemetry_fixes_are_dated_when_taken_and_move_at_town_speeds() -> None:
    """Between confirm and dropoff only fixes go out, every few s, newer each, at 0-20 m/s."""
    run = simulate("telemetry")
    for courier_id, fixes in run.fixes().items():
        for m, f in fixes:  # the simulated second it was taken, compressed by the speed
            assert abs(unix(f.ts) - (EPOCH + (m.sent_at - WALL) * SPEED)) < 0.01
        for (_, a), (_, b) in pairwise(fixes):
            dt = unix(b.ts) - unix(a.ts)
            assert 2.9 <= dt <= 6.1, (courier_id, a, b)
            assert 0 <= metres(a, b) / dt <= 20, (courier_id, a, b)
    for doc, start, end, between in trips(run):
        assert between and max(f.speed_mps or 0 for f in between) >= 6
        others = [
            m.topic
            for m in run.messages
            if f"/{doc['courier_id']}/" in m.topic
            and start + 0.5 < EPOCH + (m.sent_at - WALL) * SPEED < end - 0.5
        ]
        assert set(others) == {f"couriers/{doc['courier_id']}/location"}


def test_telemetry_couriers_drive_routes_with_turns_and_slowdowns() -> None:
    """Couriers drive street-grid routes that turn corners, slowing down along the way."""
    run = simulate("telemetry")
    mid_speeds: list[float] = []
    for doc, _, _, between in trips(run):
        pickup = place(doc["pickup"])
        leg = []
        for f in between:
            if metres(f, pickup) <= 100:
                break
            leg.append(f)
        bearings = [
            math.degrees(math.atan2((b.lng - a.lng) * math.cos(math.radians(a.lat)), b.lat - a.lat))
            for a, b in pairwise(leg)
            if metres(a, b) >= 20
        ]
        turn = max(abs((x - y + 180) % 360 - 180) for x in bearings for y in bearings)
        assert turn >= 60, doc["order_id"]  # not a straight line
        mid_speeds += [f.speed_mps or 0 for f in leg[5:-5]]
    assert min(mid_speeds) < 5 and max(mid_speeds) > 10


def test_telemetry_courier_waits_at_the_store_then_at_the_door() -> None:
    """Fixes stay near the store 2-6 min (GPS noise and all), then at the door 1-2 min."""
    run = simulate("telemetry")
    for doc, _, end, between in trips(run):
        pickup, dropoff = place(doc["pickup"]), place(doc["dropoff"])
        within = min(100, pickup.radius_m or 100)  # and inside the store's own geofence
        stays: list[list[LocationFix]] = [[]]  # runs of consecutive fixes near the store
        for f in between:
            if metres(f, pickup) <= within:
                stays[-1].append(f)
            elif stays[-1]:
                stays.append([])
        stay = max(stays, key=lambda run: unix(run[-1].ts) - unix(run[0].ts) if run else 0)
        # The wait (2-6 min), plus driving in and out of the circle (braking, a light).
        assert 120 <= unix(stay[-1].ts) - unix(stay[0].ts) <= 480
        last = between.index(stay[-1])
        assert len({(f.lat, f.lng) for f in stay}) > len(stay) / 2  # parked, yet it wanders
        door = [f for f in between[last:] if metres(f, dropoff) <= 50]
        assert door and 55 <= end - unix(door[0].ts) <= 140


def test_late_fixes_keep_the_time_they_were_taken() -> None:
    """Buffered and reordered fixes go out late with their own ts; the rest strictly increase."""
    run = simulate("telemetry", noise=ALL_NOISE)
    lateness: list[float] = []
    for fixes in run.fixes().values():
        newest = -math.inf
        taken: set[str] = set()
        for m, f in fixes:
            if f.ts in taken:  # a duplicate: the same fix sent twice
                continue
            taken.add(f.ts)
            late = EPOCH + (m.sent_at - WALL) * SPEED - unix(f.ts)
            lateness.append(late)
            if unix(f.ts) <= newest:
                assert late > 1, f
            elif late <= 1:
                newest = unix(f.ts)
    assert max(lateness) >= 30  # an offline stretch's backlog
    assert run.sim.sent["flushed"] and run.sim.sent["reordered"]


def test_noisy_telemetry_still_moves_every_order_through_the_geofence() -> None:
    """With every kind of noise, courierd's geofence rules still infer each in-between status."""
    run = simulate("telemetry", couriers=6, orders=18, noise=ALL_NOISE, seed=11)
    for kind in ("duplicate", "reordered", "flushed", "junk", "inaccurate", "jump"):
        assert run.sim.sent[kind] > 0, kind
    rules = geofence.GeofenceRules()
    rank = {s.value: i for i, s in enumerate(CHAIN)}
    state: dict[str, tuple[str, float | None]] = {}
    places: dict[str, tuple[str, Place | None, Place | None]] = {}
    bound: dict[str, str] = {}
    last: dict[str, geofence.Fix] = {}
    tracks: dict[str, geofence.Track] = {}
    sources: dict[str, list[tuple[str, str]]] = defaultdict(list)

    def reach(order_id: str, status: str, at: float, source: str) -> None:
        have = rank.get(state.get(order_id, ("new", None))[0], -1)
        for s in CHAIN[have + 1 : rank[status] + 1]:
            sources[order_id].append((s.value, source if s.value == status else "fill"))
        if rank[status] > have:
            state[order_id] = (status, at)

    for _, parsed in run.inputs():
        if isinstance(parsed, Assignment):
            places[parsed.order_id] = (parsed.courier_id, parsed.pickup, parsed.dropoff)
            bound[parsed.courier_id] = parsed.order_id
        elif isinstance(parsed, StatusEvent):
            reach(parsed.order_id, parsed.status.value, unix(parsed.ts or ""), "app")
        elif isinstance(parsed, LocationFix):
            fix = geofence.Fix(unix(parsed.ts), parsed.lat, parsed.lng, parsed.accuracy_m)
            if geofence.screen(last.get(parsed.courier_id), fix, rules) is not None:
                continue
            last[parsed.courier_id] = fix
            order_id = bound.get(parsed.courier_id, "")
            if order_id not in places:
                continue
            status, since = state.get(order_id, ("new", None))
            _, pickup, dropoff = places[order_id]
            track, found = geofence.step(
                tracks.get(order_id, geofence.Track()), status, since, pickup, dropoff, fix, rules
            )
            tracks[order_id] = track
            if found is not None:
                reach(order_id, found.value, fix.ts, "geofence")
    assert len(sources) == 18
    expected = [CONFIRMED, *(s.value for s in CHAIN[1:-1]), DROPOFF]
    for order_id, reached in sources.items():
        assert [s for s, _ in reached] == expected, order_id
        assert [src for _, src in reached] == ["app", "geofence", "geofence", "geofence", "app"]


def test_fixes_are_never_dated_after_the_clock() -> None:
    """Once simulated time catches up with the clock it slows to real time, never ahead of it."""
    run = simulate("telemetry", couriers=2, orders=2, wall=EPOCH + 600, speed=60)
    fixes = [(m, f) for per in run.fixes().values() for m, f in per]
    assert all(unix(f.ts) <= m.sent_at + 0.001 for m, f in fixes)
    assert max(unix(f.ts) for _, f in fixes) > EPOCH + 1200  # it did catch up, and went on
    assert run.sim.orders_done == 2


def test_mixed_mode_runs_both_kinds_of_courier() -> None:
    """Mixed mode: half the couriers walk the chain from the app, half send fixes instead."""
    run = simulate("mixed", couriers=4, orders=12)
    assert run.sim.kinds() == {"status": 2, "telemetry": 2}
    assignments = run.assignments()
    kinds: dict[str, set[str]] = {"status": set(), "telemetry": set()}
    for order_id, events in run.statuses().items():
        statuses = [e.status.value for _, e in events]
        if order_id in assignments:
            assert statuses == [CONFIRMED, DROPOFF]
            kinds["telemetry"].add(events[0][1].courier_id)
        else:
            assert statuses == [c.value for c in CHAIN]
            kinds["status"].add(events[0][1].courier_id)
    assert len(kinds["status"]) == 2 and len(kinds["telemetry"]) == 2
    assert not kinds["status"] & kinds["telemetry"]


def test_sandbox_labels_each_delivery_status_with_its_source() -> None:
    """The sandbox page labels each status call with x-courierd-source; /requests has it."""
    sandbox = Sandbox(api_key="k").start()
    try:
        body = b'{"delivery_status": "arrived_at_store"}'
        for source in ("geofence", "app", "<b>", None):
            headers = {"x-api-key": "k"} | ({"x-courierd-source": source} if source else {})
            sandbox.answer("POST", "/orders/o-1/delivery-status", headers, body)
        assert [r["source"] for r in sandbox.log()] == ["geofence", "app", "<b>", None]
        page = sandbox.page()
        assert "<span class='src src-geofence'>geofence</span>" in page
        assert "<span class='src src-app'>app</span>" in page
        assert "<span class='src src-other'>&lt;b&gt;</span>" in page
        with urllib.request.urlopen(f"{sandbox.url}/requests?since=1", timeout=5) as r:
            assert [e["source"] for e in json.load(r)] == ["app", "<b>", None]
    finally:
        sandbox.stop()

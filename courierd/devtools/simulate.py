"""`courierd simulate`: couriers on MQTT that publish like real phones.

Two kinds of courier, chosen by `mode` (`mixed`: every other courier is of the second kind):

- *status* couriers take an order and walk it through the whole chain from their app, with
  realistic gaps between statuses (minutes, compressed by `speed`), a location ping every
  few seconds and a retained profile.
- *telemetry* couriers are told where to go by dispatch (a `dispatch/assignments` message
  with the store and the customer) and their app sends only `dasher_confirmed` and, at
  the door, `dropoff`; in between it sends nothing but location fixes while the courier
  drives a street-grid route to the store, waits there, drives to the customer and waits
  again. courierd infers the statuses in between from those fixes (its geofence rules).

Optional noise: duplicates, reordering, offline stretches that flush late, junk payloads,
and for telemetry couriers GPS glitches (inaccurate fixes, single jumps). One thread drives
everything from a heap ordered by simulated time, so a thousand couriers cost no more
threads than one.

Simulated time. Events happen at simulated seconds since the start; the wall paces them,
`speed` simulated seconds to the real one. A telemetry courier's fixes carry the simulated
time they were taken (the geofence's dwell and departure rules read those, so a three
minute wait must look like three minutes however fast the simulation runs). courierd
refuses fixes dated in the future, so that timeline starts in the past (`epoch`, by
default an hour of real running at `speed` back) and, once it catches up with the clock,
slows to real time rather than run ahead of it. Status couriers date events by the clock.
"""

from __future__ import annotations

import heapq
import json
import math
import random
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from courierd.domain.geo import EARTH_RADIUS_M
from courierd.domain.lifecycle import CHAIN
from courierd.domain.model import Status, format_ts, iso

Mode = Literal["status", "telemetry", "mixed"]
MODES: tuple[Mode, ...] = ("status", "telemetry", "mixed")
ASSIGNMENTS_TOPIC = "dispatch/assignments"

# Typical seconds from one status to the next: confirmed → arriving → arrived → out → dropoff.
STEP_SECONDS = (20.0, 300.0, 420.0, 600.0)
PING_SECONDS = 4.0
NAMES = ("Mike Driver", "Ana Lopez", "Sam Lee", "Priya Shah", "Tom Berg", "Yuki Sato")
VEHICLES = (
    {"color": "Blue", "make": "Toyota", "model": "Camry"},
    {"color": "Red", "make": "Honda", "model": "Fit"},
    {"color": "Black", "make": "Vespa"},
)
JUNK_STATUS = (b"{not json", b"[]", b'{"status": "teleported"}', b"\xff")
JUNK_LOCATION = (
    b"{not json",
    b'{"lat": 40.7}',
    b'{"ts": "an hour ago", "lat": 40.7, "lng": -74.0}',
    b'{"ts": "2024-01-15T18:05:00Z", "lat": 91, "lng": 0}',
)

# Telemetry couriers live in a city on a street grid, in metres east (x) and north (y) of
# its centre; positions become lat/lng only when published.
CITY = (40.7484, -73.9857)  # Midtown Manhattan
CITY_RADIUS_M = 6000.0  # stores and customers stay about this close to the centre
GRID_DEG = 29.0  # Manhattan's avenues run 29° east of true north
FIX_SECONDS = (3.0, 6.0)  # a phone's fix interval while on shift
CRUISE_MPS = (6.0, 14.0)  # a scooter or car in town
SLOW_MPS = (2.5, 5.0)  # traffic, a narrow street
TURN_MPS = 4.0  # taking a corner
ACCEL_MPS2, BRAKE_MPS2 = 1.5, 2.5
STORE_KM = (2.0, 5.0)  # from the courier to the store
DROPOFF_KM = (1.0, 4.0)  # from the store to the customer
STORE_RADIUS_M = (80.0, 120.0)
STORE_WAIT_S = (120.0, 360.0)
DOOR_WAIT_S = (60.0, 120.0)
CONFIRM_S = (5.0, 20.0)  # from the assignment to the courier's tap on "confirm"
# Where the telemetry timeline starts: this much real running at `speed` before it would
# reach the clock, and never more than a week back.
HEADSTART_REAL_S = 3600.0
HEADSTART_MAX_S = 7 * 86400.0

_M_PER_DEG = EARTH_RADIUS_M * math.pi / 180
_COS_CITY = math.cos(math.radians(CITY[0]))


@dataclass(frozen=True, slots=True)
class Noise:
    """Share of messages affected by each kind of noise (0..1).

    `duplicates` and `reorder` touch statuses (and a telemetry courier's fixes), `offline`
    is the chance per message that the phone goes offline for 30-300 s and sends the
    backlog late, `junk` the chance of an unparseable message after one. `glitches` is
    the share of a telemetry courier's fixes that are wrong: half inaccurate (accuracy
    80-300 m, position off by about that), half a single jump of 400-900 m reported as
    accurate.
    """

    duplicates: float = 0.0
    reorder: float = 0.0
    offline: float = 0.0
    junk: float = 0.0
    glitches: float = 0.0


@dataclass(frozen=True, slots=True)
class Spot:
    """A point in the simulated city, metres east and north of its centre."""

    x: float
    y: float

    def latlng(self) -> tuple[float, float]:
        """Degrees (an equirectangular projection: centimetres off at city scale)."""
        return CITY[0] + self.y / _M_PER_DEG, CITY[1] + self.x / (_M_PER_DEG * _COS_CITY)

    def to(self, other: Spot) -> float:
        return math.hypot(other.x - self.x, other.y - self.y)

    def moved(self, metres: float, bearing: float) -> Spot:
        """The point `metres` away towards `bearing` (radians clockwise from north)."""
        return Spot(self.x + metres * math.sin(bearing), self.y + metres * math.cos(bearing))


def route(a: Spot, b: Spot, rng: random.Random) -> list[Spot]:
    """A street-grid path from `a` to `b` with two turns, as a courier would drive it.

    Along one axis of the grid, across, then along again; when `b` lies almost straight
    down one axis, a jog of a block or two around it instead (one-way streets do that).
    """
    th = math.radians(GRID_DEG)
    axes = ((math.sin(th), math.cos(th)), (math.cos(th), -math.sin(th)))  # avenue, street
    dx, dy = b.x - a.x, b.y - a.y
    (u, du), (v, dv) = [(ax, dx * ax[0] + dy * ax[1]) for ax in axes]
    if abs(du) < abs(dv):
        (u, du), (v, dv) = (v, dv), (u, du)
    if abs(dv) < 150:  # nearly straight: jog across and back
        j = rng.choice((-1, 1)) * rng.uniform(200, 400)
        p1 = Spot(a.x + v[0] * j, a.y + v[1] * j)
        p2 = Spot(p1.x + u[0] * du, p1.y + u[1] * du)
    else:
        if rng.random() < 0.5:
            (u, du), (v, dv) = (v, dv), (u, du)
        s = rng.uniform(0.2, 0.8)
        p1 = Spot(a.x + u[0] * du * s, a.y + u[1] * du * s)
        p2 = Spot(p1.x + v[0] * dv, p1.y + v[1] * dv)
    points = [a]
    for p in (p1, p2, b):
        if points[-1].to(p) >= 1.0:
            points.append(p)
    return points


@dataclass(slots=True)
class Drive:
    """A courier driving along `points`: how far along, how fast, and why slower.

    Speed follows a target with bounded acceleration and braking: the leg's cruise speed
    (redrawn now and then; sometimes a slow stretch), at most `TURN_MPS` at a corner and
    zero at the end (braking curves), and zero while held at a light or in a jam.
    """

    points: list[Spot]
    cruise: float
    leg: int = 0
    along: float = 0.0  # metres into the current leg
    speed: float = 0.0
    held_until: float = 0.0  # stopped (a red light, a jam) until this simulated second

    @property
    def done(self) -> bool:
        return self.leg >= len(self.points) - 1

    def position(self) -> Spot:
        if self.done:
            return self.points[-1]
        a, b = self.points[self.leg], self.points[self.leg + 1]
        f = self.along / a.to(b)
        return Spot(a.x + (b.x - a.x) * f, a.y + (b.y - a.y) * f)

    def heading(self) -> float:
        """Degrees clockwise from north of the current (else the last) leg."""
        k = min(self.leg, len(self.points) - 2)
        a, b = self.points[k], self.points[k + 1]
        return math.degrees(math.atan2(b.x - a.x, b.y - a.y)) % 360

    def advance(self, start: float, seconds: float, rng: random.Random) -> bool:
        """Drive from simulated second `start` for `seconds`, in 1 s steps; True at the end."""
        t, end = start, start + seconds
        while t < end - 1e-9 and not self.done:
            h = min(1.0, end - t)
            t += h
            leg_left = self.points[self.leg].to(self.points[self.leg + 1]) - self.along
            total_left = leg_left + sum(
                self.points[k].to(self.points[k + 1])
                for k in range(self.leg + 1, len(self.points) - 1)
            )
            if rng.random() < h / 30:
                slow = rng.random() < 0.25
                self.cruise = rng.uniform(*SLOW_MPS) if slow else rng.uniform(*CRUISE_MPS)
            if self.speed > 3 and total_left > 150 and rng.random() < h / 60:
                self.held_until = t + rng.uniform(5, 40)
            target = 0.0 if t < self.held_until else self.cruise
            if self.leg < len(self.points) - 2:
                target = min(target, math.sqrt(TURN_MPS**2 + 2 * BRAKE_MPS2 * leg_left))
            if t >= self.held_until:  # the braking curve to the end, never quite stalling
                target = min(target, max(1.0, math.sqrt(2 * BRAKE_MPS2 * total_left)))
            change = max(-BRAKE_MPS2 * h, min(ACCEL_MPS2 * h, target - self.speed))
            self.speed = max(0.0, self.speed + change)
            step = self.speed * h
            while step > 0 and not self.done:
                room = self.points[self.leg].to(self.points[self.leg + 1]) - self.along
                if step < room:
                    self.along += step
                    step = 0
                else:
                    step -= room
                    self.leg, self.along = self.leg + 1, 0.0
        if self.done:
            self.speed = 0.0
        return self.done


@dataclass(slots=True)
class Trip:
    """A telemetry courier's order: its places, and where the courier is in it.

    `phase`: assigned → to_store → at_store → to_door → at_door (then the trip ends).
    `parking` and `door` are where the courier actually stops: a few metres from the
    store's and the customer's published points.
    """

    order_id: str
    store: Spot
    radius_m: float
    customer: Spot
    parking: Spot
    door: Spot
    phase: str = "assigned"
    drive: Drive | None = None
    leave_at: float = 0.0


@dataclass
class Courier:
    """One simulated courier and its phone: mutable state the simulation plays forward.

    Status couriers use `order_id`/`step` (their place in the chain, -1 between orders)
    and a jittered `lat`/`lng`; telemetry couriers use `trip` and their true position `at`.
    """

    courier_id: str
    lat: float
    lng: float
    order_id: str = ""
    step: int = -1
    orders_done: int = 0
    offline_until: float = 0.0  # simulated second
    buffered: list[tuple[str, bytes]] = field(default_factory=list)  # the offline backlog
    held: list[tuple[str, bytes]] = field(default_factory=list)  # reordered: after the next
    telemetry: bool = False
    # Telemetry couriers: where they truly are, since when, and the GPS's current error.
    at: Spot = Spot(0.0, 0.0)
    moved_at: float = 0.0
    heading: float = 0.0
    error: tuple[float, float] = (0.0, 0.0)
    trip: Trip | None = None

    @property
    def busy(self) -> bool:
        """Whether the courier is on an order."""
        return self.step >= 0 or self.trip is not None


class Simulation:
    """Publishes through `publish(topic, payload, retain)`; `run()` until `stop` or done.

    `clock` paces the run (monotonic seconds); `wall` is the unix time a telemetry fix
    must never be dated after; `epoch` is the unix time of simulated second 0 for
    telemetry couriers (default: see the module's docstring).
    """

    def __init__(
        self,
        publish: Callable[[str, bytes, bool], None],
        *,
        couriers: int = 10,
        speed: float = 60.0,
        orders: int | None = None,
        noise: Noise | None = None,
        seed: int | None = None,
        mode: Mode = "status",
        epoch: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        on_progress: Callable[[Counter[str], int], None] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.publish = publish
        self.speed = speed
        self.mode = mode
        self.orders_left = orders
        self.noise = noise or Noise()
        self.rng = random.Random(seed)
        self.clock = clock
        self.wall = wall
        self.sent: Counter[str] = Counter()
        self.orders_done = 0
        self.on_progress = on_progress
        self.couriers: list[Courier] = []
        for i in range(couriers):
            if mode == "telemetry" or (mode == "mixed" and i % 2 == 1):
                at = Spot(self.rng.uniform(-4000, 4000), self.rng.uniform(-4000, 4000))
                lat, lng = at.latlng()
                self.couriers.append(Courier(f"courier-{i:04d}", lat, lng, telemetry=True, at=at))
            else:
                lat = 40.70 + self.rng.random() / 10
                self.couriers.append(
                    Courier(f"courier-{i:04d}", lat, -74.02 + self.rng.random() / 10)
                )
        headstart = min(speed * HEADSTART_REAL_S, HEADSTART_MAX_S)
        self.epoch = wall() - headstart if epoch is None else epoch
        self.now = 0.0  # the simulated second being played
        self._paced = any(c.telemetry for c in self.couriers)
        self._start = 0.0
        self._lead = 0.0
        self._heap: list[tuple[float, int, str, int]] = []
        self._seq = 0

    def kinds(self) -> dict[str, int]:
        """How many couriers of each kind run: `status` and `telemetry`."""
        telemetry = sum(c.telemetry for c in self.couriers)
        return {"status": len(self.couriers) - telemetry, "telemetry": telemetry}

    def _at(self, delay: float, what: str, index: int) -> None:
        """Play `_{what}` for courier `index` `delay` simulated seconds from now."""
        self._seq += 1
        heapq.heappush(self._heap, (self.now + delay, self._seq, what, index))

    def _due(self, t: float) -> float:
        """The clock reading at which simulated second `t` is played."""
        real = t / self.speed
        if self._paced:  # never date a fix after the wall clock: courierd would refuse it
            real = max(real, t - self._lead)
        return self._start + real

    def run(self, stop: threading.Event) -> Counter[str]:
        self._start, self._lead = self.clock(), self.wall() - self.epoch
        for i, c in enumerate(self.couriers):
            profile = {
                "full_name": self.rng.choice(NAMES),
                "phone": f"+1555{i:07d}",
                "vehicle": self.rng.choice(VEHICLES),
            }
            self._send(c, f"couriers/{c.courier_id}/profile", profile, kind="profile", retain=True)
            if c.telemetry:
                self._at(self.rng.uniform(0, 5), "assign", i)
                self._at(self.rng.uniform(*FIX_SECONDS), "fix", i)
            else:
                self._at(self.rng.uniform(0, 5), "status", i)
                self._at(self.rng.uniform(0, PING_SECONDS), "ping", i)
        next_progress = self.clock() + 1
        while not stop.is_set() and self._heap:
            t, _, what, i = self._heap[0]
            due, now = self._due(t), self.clock()
            if due > now:
                stop.wait(min(due - now, 0.2))
            else:
                heapq.heappop(self._heap)
                self.now = t
                getattr(self, f"_{what}")(self.couriers[i], i)
            if self.on_progress and self.clock() >= next_progress:
                self.on_progress(self.sent, self.orders_done)
                next_progress = self.clock() + 1
        if not self._heap:  # the shift is over: what the phones still hold goes out now
            for c in self.couriers:
                self._publish_held(c)
                c.offline_until = 0.0
                self._flush(c, 0)
        return self.sent

    def _take_order(self) -> bool:
        """Whether another order may start; once none may and nobody is busy, pings stop."""
        if self.orders_left is None:
            return True
        if self.orders_left > 0:
            self.orders_left -= 1
            return True
        if not any(x.busy for x in self.couriers):
            self._heap = [h for h in self._heap if h[2] not in ("ping", "fix")]
            heapq.heapify(self._heap)
        return False

    # Status couriers.

    def _status(self, c: Courier, i: int) -> None:
        if c.step < 0:
            if not self._take_order():
                return
            c.order_id, c.step = self._uuid(), 0
        event = {
            "event_id": self._uuid(),
            "order_id": c.order_id,
            "status": CHAIN[c.step].value,
            "ts": _now(),
        }
        self._send(c, f"couriers/{c.courier_id}/status", event, kind="status")
        if c.step == len(CHAIN) - 1:
            c.step, c.orders_done = -1, c.orders_done + 1
            self.orders_done += 1
            self._at(self.rng.uniform(30, 120), "status", i)
        else:
            gap = STEP_SECONDS[c.step]
            c.step += 1
            self._at(self.rng.uniform(0.5 * gap, 1.5 * gap), "status", i)

    def _ping(self, c: Courier, i: int) -> None:
        c.lat += self.rng.uniform(-1e-4, 1e-4)
        c.lng += self.rng.uniform(-1e-4, 1e-4)
        fix = {
            "ts": _now(),
            "lat": round(c.lat, 6),
            "lng": round(c.lng, 6),
            "accuracy_m": round(self.rng.uniform(3, 15), 1),
            "speed_mps": 7.5,
            "heading": 90,
        }
        self._send(c, f"couriers/{c.courier_id}/location", fix, kind="location")
        self._at(PING_SECONDS, "ping", i)

    # Telemetry couriers.

    def _assign(self, c: Courier, i: int) -> None:
        """Dispatch gives the courier an order: a store a few km away, a customer beyond."""
        if not self._take_order():
            return
        rng = self.rng
        store = self._place_near(c.at, STORE_KM)
        customer = self._place_near(store, DROPOFF_KM)
        radius = float(round(rng.uniform(*STORE_RADIUS_M)))
        c.trip = Trip(
            self._uuid(),
            store,
            radius,
            customer,
            parking=store.moved(rng.uniform(0, 20), rng.uniform(0, 2 * math.pi)),
            door=customer.moved(rng.uniform(0, 10), rng.uniform(0, 2 * math.pi)),
        )
        (plat, plng), (dlat, dlng) = store.latlng(), customer.latlng()
        doc = {
            "order_id": c.trip.order_id,
            "courier_id": c.courier_id,
            "pickup": {"lat": round(plat, 6), "lng": round(plng, 6), "radius_m": radius},
            "dropoff": {"lat": round(dlat, 6), "lng": round(dlng, 6)},
        }
        self.publish(ASSIGNMENTS_TOPIC, json.dumps(doc).encode(), False)  # dispatch's, not noisy
        self.sent["assignment"] += 1
        self._at(rng.uniform(*CONFIRM_S), "confirm", i)

    def _confirm(self, c: Courier, i: int) -> None:
        """The courier taps "confirm" and sets off for the store."""
        trip = c.trip
        assert trip is not None
        self._move(c, i)
        self._tap(c, trip, Status.DASHER_CONFIRMED)
        trip.phase = "to_store"
        trip.drive = Drive(route(c.at, trip.parking, self.rng), self.rng.uniform(*CRUISE_MPS))

    def _deliver(self, c: Courier, i: int) -> None:
        """At the door for a minute or two, the courier taps "dropoff"; next order soon."""
        trip = c.trip
        assert trip is not None
        self._tap(c, trip, Status.DROPOFF)
        c.trip, c.orders_done = None, c.orders_done + 1
        self.orders_done += 1
        self._at(self.rng.uniform(30, 120), "assign", i)

    def _tap(self, c: Courier, trip: Trip, status: Status) -> None:
        event = {
            "event_id": self._uuid(),
            "order_id": trip.order_id,
            "status": status.value,
            "ts": iso(self.epoch + self.now),
        }
        self._send(c, f"couriers/{c.courier_id}/status", event, kind="status")

    def _move(self, c: Courier, i: int) -> float:
        """Bring the courier's true position up to now; returns its speed (m/s)."""
        dt, c.moved_at = self.now - c.moved_at, self.now
        trip = c.trip
        if trip is None:
            return 0.0
        if trip.phase == "at_store" and self.now >= trip.leave_at:
            trip.phase = "to_door"
            trip.drive = Drive(route(c.at, trip.door, self.rng), self.rng.uniform(*CRUISE_MPS))
            dt = self.now - trip.leave_at
        drive = trip.drive
        if drive is None or trip.phase not in ("to_store", "to_door"):
            return 0.0
        arrived = drive.advance(self.now - dt, dt, self.rng)
        c.at, c.heading = drive.position(), drive.heading()
        if not arrived:
            return drive.speed
        trip.drive = None
        if trip.phase == "to_store":
            trip.phase, trip.leave_at = "at_store", self.now + self.rng.uniform(*STORE_WAIT_S)
        else:
            trip.phase = "at_door"
            self._at(self.rng.uniform(*DOOR_WAIT_S), "deliver", i)
        return 0.0

    def _fix(self, c: Courier, i: int) -> None:
        """The phone takes a fix: where the courier is, as a GPS would have it."""
        rng = self.rng
        speed = self._move(c, i)
        trip = c.trip
        # The GPS error wanders (it is not fresh noise each fix): a few metres on the move,
        # up to a third of the store's radius while parked among its walls.
        if trip is not None and trip.drive is not None:
            bound, step = 5.0, 2.0
        elif trip is not None and trip.phase == "at_store":
            bound, step = trip.radius_m / 3, 4.0
        else:
            bound, step = 12.0, 3.0
        ex, ey = c.error[0] + rng.uniform(-step, step), c.error[1] + rng.uniform(-step, step)
        r = math.hypot(ex, ey)
        if r > bound:
            k = max(bound, r - 2 * step) / r
            ex, ey = ex * k, ey * k
        c.error = (ex, ey)
        seen = Spot(c.at.x + ex, c.at.y + ey)
        accuracy = max(3.0, math.hypot(ex, ey) + rng.uniform(2, 8))
        roll = rng.random()
        if roll < self.noise.glitches / 2:  # multipath, a tunnel: it says it is unsure
            accuracy = rng.uniform(80, 300)
            seen = seen.moved(accuracy * rng.uniform(0.3, 1.0), rng.uniform(0, 2 * math.pi))
            self.sent["inaccurate"] += 1
        elif roll < self.noise.glitches:  # a jump it is sure of, and wrong
            seen = seen.moved(rng.uniform(400, 900), rng.uniform(0, 2 * math.pi))
            self.sent["jump"] += 1
        lat, lng = seen.latlng()
        fix = {
            "ts": iso(self.epoch + self.now),
            "lat": round(lat, 6),
            "lng": round(lng, 6),
            "accuracy_m": round(accuracy, 1),
            "speed_mps": round(max(0.0, speed + rng.uniform(-0.3, 0.3)) if speed else 0.0, 1),
            "heading": round(c.heading),
        }
        self._send(c, f"couriers/{c.courier_id}/location", fix, kind="location")
        self._at(rng.uniform(*FIX_SECONDS), "fix", i)

    def _place_near(self, origin: Spot, km: tuple[float, float]) -> Spot:
        """A point `km` away from `origin`, heading back to town if it would leave it."""
        d = self.rng.uniform(*km) * 1000
        bearing = self.rng.uniform(0, 2 * math.pi)
        spot = origin.moved(d, bearing)
        if math.hypot(spot.x, spot.y) > CITY_RADIUS_M:
            home = math.atan2(-origin.x, -origin.y)
            spot = origin.moved(d, home + self.rng.uniform(-0.8, 0.8))
        return spot

    # The phone's connection.

    def _flush(self, c: Courier, _i: int) -> None:
        """Back online: the backlog goes out at once, late, with its original times."""
        if self.now < c.offline_until:
            return  # offline again: that stretch's flush takes everything
        for topic, payload in c.buffered:
            self.publish(topic, payload, False)
        self.sent["flushed"] += len(c.buffered)
        c.buffered.clear()

    def _publish_held(self, c: Courier) -> None:
        for topic, payload in c.held:
            self.publish(topic, payload, False)
        c.held.clear()

    def _send(
        self, c: Courier, topic: str, doc: dict[str, Any], *, kind: str, retain: bool = False
    ) -> None:
        n, rng, now = self.noise, self.rng, self.now
        payload = json.dumps(doc).encode()
        if not retain and now < c.offline_until:
            c.buffered.append((topic, payload))
            self.sent[kind] += 1
            return
        if not retain and rng.random() < n.offline:
            c.offline_until = now + rng.uniform(30, 300)
            c.buffered.append((topic, payload))
            self._at(c.offline_until - now, "flush", self.couriers.index(c))
            self.sent[kind] += 1
            return
        noisy = kind == "status" or (c.telemetry and kind == "location")
        if noisy and rng.random() < n.reorder:
            c.held.append((topic, payload))  # goes out after the next message
            self.sent[kind] += 1
            self.sent["reordered"] += 1
            return
        self.publish(topic, payload, retain)
        self.sent[kind] += 1
        self._publish_held(c)
        if c.buffered:
            self._flush(c, 0)
        if noisy and rng.random() < n.duplicates:
            self.publish(topic, payload, False)
            self.sent["duplicate"] += 1
        if rng.random() < n.junk:
            where = "location" if c.telemetry and rng.random() < 0.5 else "status"
            junk = rng.choice(JUNK_LOCATION if where == "location" else JUNK_STATUS)
            self.publish(f"couriers/{c.courier_id}/{where}", junk, False)
            self.sent["junk"] += 1

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128)))


def _now() -> str:
    return format_ts(datetime.now(UTC))


def mqtt_publisher(
    host: str, port: int, client_id: str
) -> tuple[paho.Client, Callable[[str, bytes, bool], None]]:
    """A connected paho client and a QoS 1 publish function for the simulation."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    client.max_queued_messages_set(0)
    client.max_inflight_messages_set(1000)
    client.connect(host, port)
    client.loop_start()

    def publish(topic: str, payload: bytes, retain: bool) -> None:
        client.publish(topic, payload, qos=1, retain=retain)

    return client, publish


def progress_line(sent: Counter[str], orders_done: int) -> None:
    parts = " ".join(f"{k}={v}" for k, v in sorted(sent.items()))
    sys.stderr.write(f"\rsimulate: orders_done={orders_done} {parts}   ")
    sys.stderr.flush()

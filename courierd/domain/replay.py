"""`courierd replay`, pure: the geofence rules of CONTRACT.md 7 run again over what happened.

An order's `History` is what its rules consumed live: its accepted fixes in the order
consumed, and the statuses its courier's app declared, each placed after the number of
fixes the rules had consumed when it was decided. `replay` feeds them, in that order,
through the very functions the live path uses (`planner.geofence_step` for a fix,
`lifecycle.decide` for a status), so that with the settings unchanged it gives back the
times decided live, at the same fix; with other settings, the times they would decide.

Two things replay cannot know and takes as they are now: the order's places (an
assignment that moved the pickup mid-way is replayed with the last one; a store whose
point was imported since is replayed with the new point, which is how a suggested point
is checked) and the fixes screened out live (a looser `max_accuracy_m` or
`max_speed_mps` cannot bring them back; a stricter one screens the stored fixes again,
per order).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from courierd.domain import geofence
from courierd.domain.geofence import GeofenceRules, Track
from courierd.domain.lifecycle import decide
from courierd.domain.model import LocationFix, Order, Outcome, Status, StatusEvent
from courierd.domain.planner import Places, fix_time, geofence_step

# The statuses the rules can infer, in chain order.
GEOFENCE_STATUSES = (
    Status.ARRIVING_AT_STORE,
    Status.ARRIVED_AT_STORE,
    Status.DASHER_OUT_FOR_DELIVERY,
    Status.DROPOFF,
)
_COURIER = "replay"  # replay's orders have one courier; its name is never shown


@dataclass(frozen=True, slots=True)
class AppStatus:
    """A status the courier's app declared: its `at`, and the fixes consumed before it."""

    status: Status
    at: str
    after_fixes: int
    clocked: bool = True  # `at` was the app's own ts (False: the receive time stood in)


@dataclass(slots=True)
class History:
    """What an order's rules consumed live, and the geofence times decided (`was`)."""

    order_id: str
    places: Places
    fixes: list[LocationFix] = field(default_factory=list)
    app: list[AppStatus] = field(default_factory=list)
    was: dict[Status, str] = field(default_factory=dict)
    missing: int = 0  # fixes consumed live that are no longer kept (pruned by age)
    # Where the rules started over live (indexes into `fixes`: each consumed segment's
    # first fix). A change of courier is always one as well.
    starts: set[int] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class StatusChange:
    """One geofence status of one order: the `at` decided live and the `at` it would be
    (either None: it did not fire / would not)."""

    status: Status
    was: str | None
    would_be: str | None
    where: tuple[float, float] | None = None  # the fix it would fire at (lat, lng)

    @property
    def shift_s(self) -> float | None:
        """would_be - was in seconds, when both fired."""
        if self.was is None or self.would_be is None:
            return None
        return _unix(self.would_be) - _unix(self.was)

    @property
    def changed(self) -> bool:
        if self.was is None or self.would_be is None:
            return self.was != self.would_be
        return self.shift_s != 0


@dataclass(frozen=True, slots=True)
class OrderReplay:
    order_id: str
    statuses: tuple[StatusChange, ...]

    @property
    def changed(self) -> bool:
        return any(s.changed for s in self.statuses)


def replay(history: History, rules: GeofenceRules, *, screen: bool = False) -> OrderReplay:
    """The order's geofence statuses under `rules`, beside those decided live.

    `screen` screens the stored fixes again (per order) with `rules`: for a stricter
    `max_accuracy_m` / `max_speed_mps` than the one they were accepted under.
    """
    order = Order(history.order_id, courier_id=_COURIER)  # bound, as the live orders are
    track = Track()
    fired: dict[Status, LocationFix] = {}
    app = sorted(history.app, key=lambda a: a.after_fixes)  # stable: decided order kept
    pending = 0
    courier: str | None = None
    last: geofence.Fix | None = None

    def declare(upto: int) -> None:
        nonlocal pending, order
        while pending < len(app) and app[pending].after_fixes <= upto:
            a = app[pending]
            pending += 1
            ts = a.at if a.clocked else None  # as live: no ts, the timers wait for a fix
            event = StatusEvent(f"app:{a.status.value}", order.order_id, _COURIER, a.status, ts)
            order = _decided(order, event, a.at) or order

    declare(0)
    for n, fix in enumerate(history.fixes, 1):
        if courier is not None and (fix.courier_id != courier or n - 1 in history.starts):
            track = Track()  # (re)assigned: the rules start over, as they did live
        courier = fix.courier_id
        accepted = True
        if screen:
            point = geofence.Fix(fix_time(fix), fix.lat, fix.lng, fix.accuracy_m)
            accepted = geofence.screen(last, point, rules) is None
            if accepted:
                last = point
        if accepted:
            track, event = geofence_step(track, order, history.places, fix, rules)
            after = None if event is None else _decided(order, event, fix.ts)
            if event is not None and after is not None:
                fired[event.status] = fix
                order = after
        declare(n)
    statuses = tuple(
        StatusChange(s, history.was.get(s), *_when_where(fired.get(s)))
        for s in GEOFENCE_STATUSES
        if s in history.was or s in fired
    )
    return OrderReplay(history.order_id, statuses)


def _when_where(fix: LocationFix | None) -> tuple[str | None, tuple[float, float] | None]:
    return (None, None) if fix is None else (fix.ts, (fix.lat, fix.lng))


def _decided(order: Order, event: StatusEvent, received_at: str) -> Order | None:
    """The order after `event`, decided as live (the same `decide`); None if refused."""
    decision = decide(order, event, duplicate=False, profile=None, received_at=received_at)
    return decision.order if decision.outcome is Outcome.ACCEPTED else None


@dataclass(frozen=True, slots=True)
class Shift:
    """How one status moved over the orders where it fired both times."""

    status: Status
    orders: int  # where it fired both live and in replay
    median_s: float | None
    p90_s: float | None
    newly: int  # would fire, did not
    lost: int  # fired, would not


@dataclass(frozen=True, slots=True)
class Summary:
    orders: int
    changed: int
    shifts: tuple[Shift, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "orders_replayed": self.orders,
            "orders_changed": self.changed,
            "statuses": {
                s.status.value: {
                    "orders": s.orders,
                    "median_shift_s": s.median_s,
                    "p90_shift_s": s.p90_s,
                    "would_newly_fire": s.newly,
                    "would_not_fire": s.lost,
                }
                for s in self.shifts
            },
        }


def summarise(results: Iterable[OrderReplay]) -> Summary:
    """Orders replayed, orders that change, and per status the median and p90 shift."""
    orders = changed = 0
    shifts: dict[Status, list[float]] = {}
    newly: dict[Status, int] = {}
    lost: dict[Status, int] = {}
    for result in results:
        orders += 1
        changed += result.changed
        for s in result.statuses:
            if s.shift_s is not None:
                shifts.setdefault(s.status, []).append(s.shift_s)
            elif s.was is None:
                newly[s.status] = newly.get(s.status, 0) + 1
            else:
                lost[s.status] = lost.get(s.status, 0) + 1
    seen = set(shifts) | set(newly) | set(lost)
    return Summary(
        orders,
        changed,
        tuple(
            Shift(
                status,
                len(shifts.get(status, ())),
                quantile(shifts.get(status, ()), 0.5),
                quantile(shifts.get(status, ()), 0.9),
                newly.get(status, 0),
                lost.get(status, 0),
            )
            for status in GEOFENCE_STATUSES
            if status in seen
        ),
    )


def quantile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank quantile (the median of an even count is the lower middle)."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 3)  # fix times are ms


def _unix(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def app_statuses(
    rows: Iterable[tuple[str, str, str | None, int | None, int | None]],
) -> list[AppStatus]:
    """The app's declared statuses from stored transitions (status, at, source, fixes,
    clocked), in stored order. Fills and geofence rows are replay's own business; a row
    without a fix count (written before replay existed) counts as declared before any
    fix, and one without `clocked` as carrying its own ts."""
    out = []
    for status, at, source, fixes, clocked in rows:
        if source == "app" and status in _VALUES:
            out.append(AppStatus(Status(status), at, fixes or 0, clocked != 0))
    return out


def decided(rows: Iterable[tuple[str, str, str | None]]) -> dict[Status, str]:
    """The geofence times decided live, from stored transitions (status, at, source)."""
    return {Status(s): at for s, at, source in rows if source == "geofence" and s in _VALUES}


_VALUES = frozenset(s.value for s in Status)

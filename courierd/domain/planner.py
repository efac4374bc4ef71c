"""What a batch of MQTT inputs does to the store: a pure fold over `lifecycle.decide`.

The ingest process loads a `Snapshot` of the rows the batch touches, calls
`plan_batch`, and writes the resulting `Effects` in the same transaction. Keeping this
pure lets the property tests replay arbitrary batchings, duplicates and crashes
without a database.

Every status goes through `decide`, whoever says so: a courier's app, or the geofence
rules reading its fixes (an inferred status is an ordinary status event of the bound
courier, with a deterministic id `geo:{order}:{status}`, which no app's id can squat:
see `_Batch._status`). Fixes also keep each courier's last accepted position, and
every valid message from a courier marks it seen: one that had been reported offline
is reported back (CONTRACT.md 9).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import lru_cache
from typing import Any

from courierd.domain import geofence
from courierd.domain.geofence import GeofenceRules, Track
from courierd.domain.lifecycle import FINISHED, decide
from courierd.domain.model import (
    OUTCOME_TEXT,
    REJECTED_OUTCOMES,
    Assignment,
    CourierOffline,
    DeadLetter,
    Decision,
    Ignored,
    Input,
    LocationFix,
    Order,
    Outcome,
    Place,
    ProfileUpdate,
    Push,
    StatusEvent,
    Transition,
    dumps,
    iso,
)
from courierd.domain.restaurant import Kind, courier_topic, message

ALERTS_TOPIC = "dispatch/alerts"


@dataclass(slots=True)
class CourierState:
    """What courierd keeps per courier: its last accepted fix, when it was last heard
    from (courierd's clock), whether it has been reported offline, and when its last
    accepted fix arrived (courierd's clock: its orders are not abandoned meanwhile)."""

    fix: LocationFix | None = None
    last_seen: float | None = None
    offline: bool = False
    fix_at: float | None = None


# The fixes an order's rules consumed, as segments (courier_id, first fix ts, count):
# each courier's accepted fixes are consumed in ts order, so a segment is that courier's
# kept fixes from `first` on, `count` of them. A segment starts wherever the rules start
# over (the order's first fix, and the first after an assignment changed its courier,
# even back to one it had before: that courier's fixes meanwhile were not this order's),
# and replay starts the rules over at each segment.
Consumed = tuple[tuple[str, str, int], ...]


def consumed_after(consumed: Consumed, fix: LocationFix, *, fresh: bool = False) -> Consumed:
    """The segments once `fix` is consumed too; `fresh`: the rules start over at it."""
    # Tuples concatenated (noqa RUF005): `(*consumed, ...)` builds a list and turns it
    # into a tuple, 0.6k instructions more a fix of a geofenced order.
    if consumed and not fresh:
        courier, first, count = consumed[-1]
        if courier == fix.courier_id:
            return consumed[:-1] + ((courier, first, count + 1),)  # noqa: RUF005
    return consumed + ((fix.courier_id, fix.ts, 1),)  # noqa: RUF005


@dataclass(frozen=True, slots=True)
class Places:
    """Where an order is picked up and dropped off, as far as courierd knows."""

    pickup: Place | None = None
    dropoff: Place | None = None


@dataclass(frozen=True, slots=True)
class Notification:
    """A QoS 1 message for courierd to publish (alerts, order events), JSON payload."""

    topic: str
    payload: str


@dataclass(slots=True)
class Snapshot:
    """The stored rows a batch needs.

    Rows that could not be read (an unknown state, a profile that is not JSON) are
    named in `corrupt_orders` / `corrupt_profiles`: events that need them are refused
    (`corrupt_row`) instead of stopping ingest for everyone. `active` lists, for the
    couriers that sent fixes or a last will, their orders that are bound and not
    finished; `places` and `tracks` are those orders' places and geofence state.
    """

    orders: dict[str, Order] = field(default_factory=dict)
    seen_event_ids: set[tuple[str, str]] = field(default_factory=set)  # (order id, event id)
    profiles: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    corrupt_orders: set[str] = field(default_factory=set)
    corrupt_profiles: set[str] = field(default_factory=set)
    couriers: dict[str, CourierState] = field(default_factory=dict)
    active: dict[str, set[str]] = field(default_factory=dict)
    places: dict[str, Places] = field(default_factory=dict)
    tracks: dict[str, Track] = field(default_factory=dict)
    consumed: dict[str, Consumed] = field(default_factory=dict)  # per order: see Consumed


@dataclass(slots=True)
class Effects:
    """Everything one batch writes, in one transaction."""

    orders: dict[str, Order] = field(default_factory=dict)
    transitions: list[Transition] = field(default_factory=list)
    pushes: list[Push] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    event_ids: set[tuple[str, str]] = field(default_factory=set)  # (order id, event id)
    profiles: dict[str, Mapping[str, Any] | None] = field(default_factory=dict)
    couriers: dict[str, CourierState] = field(default_factory=dict)  # changed ones
    assigned: dict[str, Places] = field(default_factory=dict)  # places from dispatch
    tracks: dict[str, Track] = field(default_factory=dict)
    # Accepted fixes some order's rules consumed (kept, for replay and the page), what
    # each order consumed, and for `transitions[i]` the number of fixes its order had
    # consumed when it was decided (replay puts it back there).
    track_points: list[LocationFix] = field(default_factory=list)
    consumed: dict[str, Consumed] = field(default_factory=dict)
    transition_fixes: list[int] = field(default_factory=list)
    notifications: list[Notification] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)


def plan_batch(
    snapshot: Snapshot,
    inputs: Iterable[Input],
    *,
    now: float,
    geofence_rules: GeofenceRules | None = None,
) -> Effects:
    """Decide every input in arrival order; later inputs see earlier ones' effects.

    `now` is courierd's clock (receive time); `geofence_rules` None turns inference off.
    """
    batch = _Batch(snapshot, now, geofence_rules)
    for item in fixes_in_time_order(inputs):
        batch.add(item)
    return batch.fx


def fixes_in_time_order(inputs: Iterable[Input]) -> list[Input]:
    """The batch with its location fixes put in the order they were taken, each in one of
    the places the fixes held; every other input keeps its place.

    Fixes reach courierd out of order: a phone flushes a buffer, and a cluster's shared
    subscriptions hand a courier's consecutive messages to different sessions. Taken
    out of order, a newer fix would make the older ones "not newer", and they would be
    ignored; in time order, all of them count.
    """
    items = list(inputs)
    where = [i for i, item in enumerate(items) if isinstance(item, LocationFix)]
    fixes = sorted((f for f in items if isinstance(f, LocationFix)), key=lambda f: f.ts)
    for i, fix in zip(where, fixes, strict=True):
        items[i] = fix
    return items


def fix_time(fix: LocationFix) -> float:
    """A fix's own time as unix seconds (its `ts` is the stored UTC text)."""
    return datetime.fromisoformat(fix.ts).timestamp()


def geofence_fix(fix: LocationFix) -> geofence.Fix:
    """A fix as the rules and the filters see it."""
    return geofence.Fix(fix_time(fix), fix.lat, fix.lng, fix.accuracy_m, fix.speed_mps)


class _Batch:
    """The fold's state: the snapshot, updated by each input in turn."""

    def __init__(self, snap: Snapshot, now: float, rules: GeofenceRules | None) -> None:
        self.snap = snap
        self.now = now
        self.received_at = iso(now)
        self.rules = rules
        self.orders = dict(snap.orders)
        self.seen = set(snap.seen_event_ids)
        self.profiles: dict[str, Mapping[str, Any] | None] = dict(snap.profiles)
        self.corrupt_profiles = set(snap.corrupt_profiles)
        self.active = {c: set(ids) for c, ids in snap.active.items()}
        self.places = dict(snap.places)
        self.tracks = dict(snap.tracks)
        self.consumed = dict(snap.consumed)
        self.fx = Effects()

    def add(self, item: Input) -> None:
        if isinstance(item, StatusEvent):
            self._seen(item.courier_id)
            self._status(item)
        elif isinstance(item, LocationFix):
            self._seen(item.courier_id)
            self._fix(item)
        elif isinstance(item, ProfileUpdate):
            self.profiles[item.courier_id] = self.fx.profiles[item.courier_id] = item.courier_info
            self.corrupt_profiles.discard(item.courier_id)  # a new profile replaces a bad row
            self.fx.counts["profile"] += 1
        elif isinstance(item, Assignment):
            self._assignment(item)
        elif isinstance(item, CourierOffline):
            self._offline(item.courier_id)
        elif isinstance(item, Ignored):
            self.fx.counts[f"ignored_{item.kind}"] += 1
        else:
            self.fx.dead_letters.append(item)
            self.fx.counts["rejected"] += 1

    # -- statuses ---------------------------------------------------------------------

    def _status(self, event: StatusEvent) -> None:
        app = event.source == "app"
        if event.order_id in self.snap.corrupt_orders or (
            event.courier_info is None and event.courier_id in self.corrupt_profiles
        ):
            decision = Decision(_CORRUPT_ROW, Order(event.order_id))
        else:
            decision = decide(
                self.orders.get(event.order_id),
                event,
                # Whether the event's id was seen before, for its order (CONTRACT.md 12).
                # Ids are an app's to choose, so they are deduplicated per order: one
                # courier's app, however it numbers its events, never suppresses another
                # order's status. An inferred status is never checked against them: the
                # chain already makes it once (at or behind the order's state it is
                # stale), and an app that speaks its id `geo:{order}:{status}` must not
                # be able to squat it.
                duplicate=app and (event.order_id, event.event_id) in self.seen,
                profile=self.profiles.get(event.courier_id),
                received_at=self.received_at,
            )
        outcome = decision.outcome
        if app:
            key = (event.order_id, event.event_id)
            if key not in self.seen and outcome is not _CORRUPT_ROW:
                self.seen.add(key)
                self.fx.event_ids.add(key)
            self.fx.counts[OUTCOME_TEXT[outcome]] += 1
        elif outcome is _ACCEPTED:
            self.fx.counts["geofence_status"] += 1
        if outcome in REJECTED_OUTCOMES:
            self.fx.dead_letters.append(_rejected(event, outcome))
            return
        transitions = decision.transitions
        if transitions:
            self._bind(decision.order)
            self.fx.transitions.extend(transitions)
            consumed = self.consumed.get(event.order_id)
            count = sum(n for _, _, n in consumed) if consumed else 0
            self.fx.transition_fixes.extend([count] * len(transitions))
            self.fx.pushes.extend(decision.pushes)

    def _bind(self, order: Order) -> None:
        """Record the order's new state, and keep `active` (courier → orders) true. A
        courier newly bound is told what OneTablet already said about the order."""
        before = self.orders.get(order.order_id)
        self.orders[order.order_id] = self.fx.orders[order.order_id] = order
        if before is not None and before.courier_id is not None:
            was = self.active.get(before.courier_id)
            if was is not None:
                was.discard(order.order_id)
        if order.courier_id is not None and order.state not in FINISHED:
            ids = self.active.get(order.courier_id)  # (no empty set made per status)
            if ids is None:
                self.active[order.courier_id] = {order.order_id}
            else:
                ids.add(order.order_id)
        if (
            order.courier_id is not None
            and (order.confirmed_at is not None or order.ready_at is not None)
            and (before is None or before.courier_id != order.courier_id)
        ):
            for kind, at in ((Kind.CONFIRMED, order.confirmed_at), (Kind.READY, order.ready_at)):
                if at is not None:
                    topic = courier_topic(order.courier_id)
                    self.fx.notifications.append(
                        Notification(topic, message(kind, order.order_id, at))
                    )

    def _assignment(self, item: Assignment) -> None:
        if item.order_id in self.snap.corrupt_orders:
            self.fx.dead_letters.append(
                DeadLetter(
                    "dispatch/assignments",
                    item.raw,
                    Outcome.CORRUPT_ROW.value,
                    f"the stored row of order {item.order_id} is unreadable",
                )
            )
            self.fx.counts[Outcome.CORRUPT_ROW.value] += 1
            return
        current = self.orders.get(item.order_id) or Order(item.order_id)
        if current.state in FINISHED:
            # Dropped off, cancelled or expired: its courier and places are history (a
            # rebind would put a finished order back on a courier's active list).
            self.fx.counts["ignored_finished_assignment"] += 1
            return
        if _older(item.ts, current.assigned_at):
            # Late (a phone, a broker, a cluster's shared subscription reorder them): the
            # order keeps its newer assignment, courier and places alike.
            self.fx.counts["ignored_stale_assignment"] += 1
            return
        if current.courier_id != item.courier_id:
            self.tracks[item.order_id] = self.fx.tracks[item.order_id] = Track()  # new courier
        self._bind(replace(current, courier_id=item.courier_id, assigned_at=item.ts))
        if item.pickup is not None or item.dropoff is not None:
            known = self.places.get(item.order_id, Places())
            places = Places(item.pickup or known.pickup, item.dropoff or known.dropoff)
            self.places[item.order_id] = places
            self.fx.assigned[item.order_id] = Places(item.pickup, item.dropoff)
        self.fx.counts["assignment"] += 1

    # -- couriers ---------------------------------------------------------------------

    def _courier(self, courier_id: str) -> CourierState:
        state = self.fx.couriers.get(courier_id)
        if state is None:
            known = self.snap.couriers.get(courier_id) or CourierState()
            state = self.fx.couriers[courier_id] = CourierState(
                known.fix, known.last_seen, known.offline, known.fix_at
            )
        return state

    def _seen(self, courier_id: str) -> None:
        """A valid message from the courier: it is there (and back, if reported gone)."""
        state = self._courier(courier_id)
        state.last_seen = self.now
        if state.offline:
            state.offline = False
            self._alert("courier_back", courier_id, self.now)

    def _offline(self, courier_id: str) -> None:
        """A last will: reported offline at once, if it has work (once per silence)."""
        self.fx.counts["lwt"] += 1
        state = self._courier(courier_id)
        if state.offline or not self.active.get(courier_id):
            return
        state.offline = True
        self._alert("courier_offline", courier_id, state.last_seen)

    def _alert(self, kind: str, courier_id: str, last_seen: float | None) -> None:
        payload = {
            "type": kind,
            "courier_id": courier_id,
            "order_ids": sorted(self.active.get(courier_id, ())),
            "last_seen": None if last_seen is None else iso(last_seen),
            "at": self.received_at,
        }
        self.fx.notifications.append(Notification(ALERTS_TOPIC, dumps(payload)))
        self.fx.counts[kind] += 1

    # -- fixes ------------------------------------------------------------------------

    def _fix(self, fix: LocationFix) -> None:
        """Screen the fix against the courier's last accepted one; then the geofences of
        the courier's active orders that have places."""
        state = self._courier(fix.courier_id)
        point = geofence_fix(fix)
        last = state.fix
        previous = None
        if last is not None:
            previous = geofence.Fix(fix_time(last), last.lat, last.lng, last.accuracy_m)
        rules = self.rules or GeofenceRules()
        reason = geofence.screen(previous, point, rules)
        if reason is not None:
            self.fx.counts[f"fix_{reason}"] += 1
            return
        state.fix = fix
        state.fix_at = self.now
        self.fx.counts["location"] += 1
        if self.rules is None:
            return
        tracked = False
        ids = self.active.get(fix.courier_id, ())
        # A copy: a status found here may take its order out of `ids` (a dropoff). Most
        # couriers have one order, which needs no sort.
        for order_id in sorted(ids) if len(ids) > 1 else tuple(ids):
            places = self.places.get(order_id)
            order = self.orders.get(order_id)
            if places is None or order is None or order.courier_id != fix.courier_id:
                continue
            tracked = True
            self._step(order, places, fix, point)
        if tracked:
            self.fx.track_points.append(fix)

    def _step(self, order: Order, places: Places, fix: LocationFix, point: geofence.Fix) -> None:
        oid = order.order_id
        assert self.rules is not None
        track = self.tracks.get(order.order_id, _NO_TRACK)
        # A track that never consumed a fix is new, or was reset by a new assignment.
        fresh = track.last_ts is None
        self.consumed[oid] = self.fx.consumed[oid] = consumed_after(
            self.consumed.get(oid, ()), fix, fresh=fresh
        )
        track, event = geofence_step(track, order, places, fix, self.rules, point)
        self.tracks[order.order_id] = self.fx.tracks[order.order_id] = track
        if event is not None:
            self._status(event)


# Read off the enum once: each `Outcome.X` is a lookup through the enum's class.
_ACCEPTED, _CORRUPT_ROW = Outcome.ACCEPTED, Outcome.CORRUPT_ROW
_NO_TRACK = Track()  # an order's track before its first fix (immutable: one will do)


def geofence_step(
    track: Track,
    order: Order,
    places: Places,
    fix: LocationFix,
    rules: GeofenceRules,
    point: geofence.Fix | None = None,
) -> tuple[Track, StatusEvent | None]:
    """One accepted fix of the bound courier through an order's geofence rules: the new
    track, and the status event to decide, if one fires. The live path and
    `courierd replay` (domain/replay.py) both take this one step, so they agree.
    `point` is `fix` as the rules see it, when the caller has it already (its ts read
    once per fix, not once per order)."""
    # Fix time only: when the app sent no ts, the first fix seen at the status stands in
    # for its start (buffered fixes sent late then depart as they would live).
    since = None if order.status_ts is None else _unix(order.status_ts)
    if point is None:
        point = geofence_fix(fix)
    track, status = geofence.step(
        track, order.state, since, places.pickup, places.dropoff, point, rules
    )
    if status is None:
        return track, None
    event = StatusEvent(
        f"geo:{order.order_id}:{status.value}",
        order.order_id,
        order.courier_id or fix.courier_id,
        status,
        fix.ts,
        source="geofence",
        where=(fix.lat, fix.lng),
    )
    return track, event


def _older(ts: str | None, assigned_at: str | None) -> bool:
    """Whether an assignment stamped `ts` is older than the order's current one.

    An assignment without a ts counts as older than any with one (dispatch's clock is
    never mixed with courierd's); among those without, the one received last wins, as
    before assignments had a ts. Equal stamps: the one received last wins, so a
    redelivered assignment changes nothing. The stored form is UTC text of fixed width,
    so text order is time order.
    """
    if assigned_at is None:
        return False
    return ts is None or ts < assigned_at


@lru_cache(maxsize=65_536)  # as many as the writer's memos hold
def _unix(text: str) -> float | None:
    """Pure, and read for every fix of every geofenced order: each order's status time
    is parsed once, not once per fix."""
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _rejected(event: StatusEvent, outcome: Outcome) -> DeadLetter:
    """A refused event, kept as a dead letter with its original payload."""
    if outcome is Outcome.CANCELLED:
        detail = f"order {event.order_id} is cancelled"
    elif outcome is Outcome.EXPIRED:
        detail = f"order {event.order_id} expired (nothing happened to it for too long)"
    elif outcome is Outcome.WRONG_COURIER:
        detail = f"order {event.order_id} is bound to another courier than {event.courier_id}"
    else:
        detail = f"a stored row event {event.event_id} needs (order or profile) is unreadable"
    return DeadLetter(f"couriers/{event.courier_id}/status", event.raw, outcome.value, detail)

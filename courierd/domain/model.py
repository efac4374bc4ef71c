"""Plain values shared by the core and the edges: statuses, inputs, decisions.

Everything here is a frozen dataclass or an enum, so the pure core can be driven with
plain values in tests and nothing is mutated behind anyone's back. The values every
message makes (`value`) are frozen for mypy, which refuses any assignment to their
fields, and not at run time, where a frozen dataclass sets each field through
`object.__setattr__`: 13k instructions to build a Transition, 3k unfrozen.
"""

from __future__ import annotations

import enum
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, dataclass_transform

JSON = dict[str, Any]
_T = TypeVar("_T")


@dataclass_transform(frozen_default=True)
def value(cls: type[_T]) -> type[_T]:
    """A frozen dataclass to mypy (it refuses any assignment to a field),
    hashed and compared by its fields like one; at run time built at the cost of a
    plain dataclass (see the module text)."""
    return dataclass(slots=True, unsafe_hash=True)(cls)


class Status(enum.StrEnum):
    """Delivery statuses OneTablet knows (its "Delivery Status Values")."""

    DASHER_CONFIRMED = "dasher_confirmed"
    ARRIVING_AT_STORE = "arriving_at_store"
    ARRIVED_AT_STORE = "arrived_at_store"
    DASHER_OUT_FOR_DELIVERY = "dasher_out_for_delivery"
    DROPOFF = "dropoff"


# Each member's text: a dict lookup, where `.value` (an enum property, Python code on
# CPython 3.11) costs about 1.5 µs, and a status passes several of them.
STATUS_TEXT: dict[Status, str] = {s: s.value for s in Status}

# OneTablet's cancel_reason values (API text, "Cancel Order").
CANCEL_REASONS = ("ITEM_OUT_OF_STOCK", "STORE_CLOSED", "KITCHEN_BUSY", "OTHER")

# Order states beyond the delivery statuses: before the first status, cancelled, and
# expired (abandoned: nothing happened to it for `store.abandon_after_h`; never pushed).
NEW = "new"
CANCELLED = "cancelled"
EXPIRED = "expired"


class Outcome(enum.StrEnum):
    """What one status event did to its order."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"  # event_id seen before
    STALE = "stale"  # status at or behind the order's current one
    CANCELLED = "cancelled"  # order was cancelled: rejected, dead-lettered
    EXPIRED = "expired"  # order expired (abandoned): rejected, dead-lettered
    WRONG_COURIER = "wrong_courier"  # order is bound to another courier: rejected
    CORRUPT_ROW = "corrupt_row"  # a stored row it needs is unreadable: rejected


OUTCOME_TEXT: dict[Outcome, str] = {o: o.value for o in Outcome}  # see STATUS_TEXT
REJECTED_OUTCOMES = frozenset(
    {Outcome.CANCELLED, Outcome.EXPIRED, Outcome.WRONG_COURIER, Outcome.CORRUPT_ROW}
)


@value
class StatusEvent:
    """A courier's status event from `couriers/{courier_id}/status`."""

    event_id: str
    order_id: str
    courier_id: str
    status: Status
    ts: str | None = None  # RFC 3339, normalised to UTC
    courier_info: Mapping[str, Any] | None = None
    raw: bytes = field(default=b"", compare=False, repr=False)  # kept for dead letters
    source: str = "app"  # or "geofence": inferred from the courier's fixes
    where: tuple[float, float] | None = None  # the fix a geofence status fired at

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled once per message to the ingest process: rebuilt by a call with its
        # fields, half the cost of the default (a dict of slots set one by one).
        return type(self), (
            self.event_id,
            self.order_id,
            self.courier_id,
            self.status,
            self.ts,
            self.courier_info,
            self.raw,
            self.source,
            self.where,
        )


@value
class LocationFix:
    """A courier's position from `couriers/{courier_id}/location`."""

    courier_id: str
    ts: str
    lat: float
    lng: float
    accuracy_m: float | None = None
    speed_mps: float | None = None
    heading: float | None = None

    def __reduce__(self) -> tuple[Any, ...]:  # see StatusEvent's
        return type(self), (
            self.courier_id,
            self.ts,
            self.lat,
            self.lng,
            self.accuracy_m,
            self.speed_mps,
            self.heading,
        )


@dataclass(frozen=True, slots=True)
class ProfileUpdate:
    """A retained courier profile; `courier_info` None means the retained one was cleared."""

    courier_id: str
    courier_info: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class Place:
    """A pickup or dropoff point; `radius_m` None means the configured default."""

    lat: float
    lng: float
    radius_m: float | None = None


@dataclass(frozen=True, slots=True)
class Assignment:
    """Dispatch (re)binds an order to a courier, and may say where its places are."""

    order_id: str
    courier_id: str
    raw: bytes = field(default=b"", compare=False, repr=False)  # kept for dead letters
    pickup: Place | None = None
    dropoff: Place | None = None
    ts: str | None = None  # when dispatch made it (RFC 3339, normalised to UTC), if it says


@dataclass(frozen=True, slots=True)
class CourierOffline:
    """The courier's phone is gone: its MQTT last will (courierd's or OwnTracks')."""

    courier_id: str


@dataclass(frozen=True, slots=True)
class Ignored:
    """A valid message courierd has no use for (an OwnTracks waypoint, say): counted."""

    kind: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message courierd could not use, kept with the reason."""

    topic: str
    payload: bytes  # at most the first DEAD_LETTER_KEEP bytes are stored
    reason: str
    detail: str
    size: int | None = None  # the original payload size, when only its start was kept


Input = (
    StatusEvent | LocationFix | ProfileUpdate | Assignment | CourierOffline | Ignored | DeadLetter
)


@value
class Order:
    """The stored state of one order."""

    order_id: str
    state: str = NEW
    courier_id: str | None = None
    held: bool = False  # a cancel is in progress: new pushes wait until it is decided
    status_at: str | None = None  # when it reached `state` (the transition's `at`)
    confirmed_at: str | None = None  # OneTablet said the restaurant confirmed it
    ready_at: str | None = None  # OneTablet said the food is ready
    # The `ts` of the assignment that bound the order (None: none had one): an older
    # assignment never replaces it.
    assigned_at: str | None = None
    # When it reached `state` on the clock of the event that took it there: the app's
    # `ts` or the fix's. None when the app sent no ts: `status_at` is then courierd's
    # receive time, which the geofence timers never mix with fix times (CONTRACT.md 7).
    status_ts: str | None = None

    @property
    def cancelled(self) -> bool:
        return self.state == CANCELLED


@value
class Transition:
    """One status an order reached; `inferred` when filled in for a skipped status.

    `source`: "app" (the courier's app said so), "geofence" (its fixes did) or "fill"
    (skipped, filled in before a later status); `where` is the fix a geofence status
    fired at; `clocked` says `at` is the event's own ts (False: it had none, and the
    receive time stands in; the geofence timers then wait for a fix, and replay must
    know it to decide as live).
    """

    order_id: str
    status: Status
    inferred: bool
    event_id: str
    at: str
    source: str = "app"
    where: tuple[float, float] | None = None
    clocked: bool = True


@value
class Push:
    """One delivery-status call to make, in order, for an order."""

    order_id: str
    status: Status
    body: str  # the JSON body, fixed when decided so every retry sends the same bytes
    idempotency_key: str
    source: str = "app"  # the transition's: app, geofence or fill


@value
class Decision:
    """What an event does: the order afterwards, and what to record and push."""

    outcome: Outcome
    order: Order
    transitions: tuple[Transition, ...] = ()
    pushes: tuple[Push, ...] = ()


@dataclass(slots=True)
class BatchReport:
    """What one committed batch did: sent from the ingest process for /metrics."""

    size: int
    kinds: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    tracking: Counter[str] = field(default_factory=Counter)  # fix_*, geofence_*, ...
    transitions: int = 0
    pushes: int = 0
    notifications: int = 0  # MQTT messages written for the notifier to publish
    waited_s: float = 0.0  # the oldest message's wait in the MQTT process (set there)
    commit_s: float = 0.0  # from handing the batch over to hearing it is committed
    clock_offset: float | None = None  # courierd's clock (DbClock) minus the host's


@dataclass(slots=True)
class DispatchStats:
    """What the dispatcher did since the last report, and the outbox as it last saw it.

    The dispatcher runs in its own process; these plain values travel to the MQTT
    process, which owns /metrics and /healthz.
    """

    outcomes: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    auth_paused: bool = False
    pending: int = 0
    oldest_pending_age_s: float = 0.0
    failed: int = 0
    heartbeat_age_s: float = 0.0
    couriers_offline: int = 0
    watchdog_alerts: int = 0  # courier_offline alerts the watchdog wrote since last report
    # Seconds each delivered push spent in each stage (claim, send, reply, record).
    stages: dict[str, list[float]] = field(default_factory=dict)
    # The broker's own counts, as last seen ("stored", "dropped"; edges/publisher.py).
    broker_counts: dict[str, int] = field(default_factory=dict)

    def add_stages(self, **seconds: float) -> None:
        for stage, value in seconds.items():
            self.stages.setdefault(stage, []).append(max(0.0, value))

    def take(self, heartbeat_age_s: float) -> DispatchStats:
        """A copy to send, resetting the deltas (outcomes, latencies)."""
        out = DispatchStats(
            Counter(self.outcomes),
            list(self.latencies),
            self.auth_paused,
            self.pending,
            self.oldest_pending_age_s,
            self.failed,
            heartbeat_age_s,
            self.couriers_offline,
            stages=self.stages,
        )
        self.outcomes.clear()
        self.latencies.clear()
        self.stages = {}
        return out


def drop_nulls(value: Any) -> Any:
    """Remove None values and empty objects, recursively: absent fields are left out."""
    if isinstance(value, Mapping):
        cleaned = {k: drop_nulls(v) for k, v in value.items() if v is not None}
        return {k: v for k, v in cleaned.items() if v != {}}
    return value


# One encoder for the process: `json.dumps` with any option builds a new encoder per
# call, a third of the cost of encoding a small document (a track, a push body).
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def dumps(value: Any) -> str:
    """Compact JSON, the one serialisation courierd stores and sends."""
    return _ENCODER.encode(value)


def format_ts(when: datetime) -> str:
    """The one timestamp format courierd stores: UTC, milliseconds, `Z`."""
    if when.tzinfo is not UTC:  # (what the parsers give is UTC already)
        when = when.astimezone(UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso(unix_time: float) -> str:
    """A unix time in the stored timestamp format."""
    return format_ts(datetime.fromtimestamp(unix_time, UTC))

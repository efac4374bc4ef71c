"""The delivery lifecycle: one state machine, and the pure decision of what an event does.

`DeliveryLifecycle` is the single definition of the chain. Building and driving a
python-statemachine instance costs hundreds of microseconds, too much per MQTT message,
so the transition table is read off the class once at import (`CHAIN`, `CANCELLABLE`)
and `decide` works on that table. `tests/test_lifecycle.py` drives the real machine
against the table to prove they agree.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from json.encoder import encode_basestring
from typing import Any

from statemachine import State, StateMachine

from courierd.domain.model import (
    CANCELLED,
    EXPIRED,
    NEW,
    STATUS_TEXT,
    Decision,
    Order,
    Outcome,
    Push,
    Status,
    StatusEvent,
    Transition,
    drop_nulls,
    dumps,
)
from courierd.errors import InputError


class DeliveryLifecycle(StateMachine):
    """dasher_confirmed → arriving_at_store → arrived_at_store → out_for_delivery → dropoff.

    An order can be cancelled from any state before dropoff; it expires when nothing
    happened to it for `store.abandon_after_h` (housekeeping does that, never an event).
    Dropoff, cancelled and expired are final.
    """

    new = State(initial=True, value=NEW)
    dasher_confirmed = State(value=Status.DASHER_CONFIRMED.value)
    arriving_at_store = State(value=Status.ARRIVING_AT_STORE.value)
    arrived_at_store = State(value=Status.ARRIVED_AT_STORE.value)
    dasher_out_for_delivery = State(value=Status.DASHER_OUT_FOR_DELIVERY.value)
    dropoff = State(final=True, value=Status.DROPOFF.value)
    cancelled = State(final=True, value=CANCELLED)
    expired = State(final=True, value=EXPIRED)

    advance = (
        new.to(dasher_confirmed)
        | dasher_confirmed.to(arriving_at_store)
        | arriving_at_store.to(arrived_at_store)
        | arrived_at_store.to(dasher_out_for_delivery)
        | dasher_out_for_delivery.to(dropoff)
    )
    cancel = (
        new.to(cancelled)
        | dasher_confirmed.to(cancelled)
        | arriving_at_store.to(cancelled)
        | arrived_at_store.to(cancelled)
        | dasher_out_for_delivery.to(cancelled)
    )
    expire = (
        new.to(expired)
        | dasher_confirmed.to(expired)
        | arriving_at_store.to(expired)
        | arrived_at_store.to(expired)
        | dasher_out_for_delivery.to(expired)
    )


def _read_table() -> tuple[tuple[Status, ...], frozenset[str], frozenset[str]]:
    """Follow `advance` from the initial state to get the chain; collect cancellable states."""
    by_id = {s.id: s for s in DeliveryLifecycle.states}
    advance: dict[str, str] = {}
    cancellable: set[str] = set()
    for state in DeliveryLifecycle.states:
        for t in state.transitions:
            target = t.targets[0]
            if t.event == "advance":
                advance[state.value] = target.value
            elif t.event == "cancel":
                cancellable.add(state.value)
    chain: list[Status] = []
    current = next(s for s in by_id.values() if s.initial).value
    while current in advance:
        current = advance[current]
        chain.append(Status(current))
    values = frozenset(s.value for s in DeliveryLifecycle.states)
    return tuple(chain), frozenset(cancellable), values


CHAIN, CANCELLABLE, STATE_VALUES = _read_table()
# Orders nothing more happens to: the chain's end, cancelled and expired.
FINISHED = frozenset({CHAIN[-1].value, CANCELLED, EXPIRED})


# The same, for SQL: whether the order in `column` is active, or finished. Spelled as
# comparisons, not `state NOT IN (...)`: SQLite evaluates a partial index's WHERE on
# every row an UPDATE writes to a column it names (every transition writes `state`),
# and an IN list of three values or more costs it a temporary table each time, about
# 5 µs per index and row (SQLite 3.40). The partial indexes on orders are spelled the
# same way (schema.py, SQLite migration 9): a query uses one only if its WHERE holds
# the very terms of the index's.
def active_sql(column: str = "state") -> str:
    return "(" + " AND ".join(f"{column} <> '{s}'" for s in sorted(FINISHED)) + ")"


def finished_sql(column: str = "state") -> str:
    return "(" + " OR ".join(f"{column} = '{s}'" for s in sorted(FINISHED)) + ")"


_RANK: dict[str, int] = {NEW: -1, **{s.value: i for i, s in enumerate(CHAIN)}}


def valid_state(value: object) -> bool:
    """Whether a stored state value is one the machine knows (else the row is corrupt)."""
    return value in STATE_VALUES


_KEY_HASH = hashlib.sha1(uuid.NAMESPACE_URL.bytes + b"courierd:")


def idempotency_key(order_id: str, status: Status) -> str:
    """Stable for the life of the push: each status is pushed once per order.

    `uuid.uuid5(NAMESPACE_URL, "courierd:{order_id}:{status}")` as text, written out
    here: the same SHA-1, version and variant bits, without building a UUID object
    (uuid5 and str() were a tenth of the ingest process's time on statuses)."""
    sha = _KEY_HASH.copy()  # the namespace and "courierd:" hashed once, at import
    sha.update(f"{order_id}:{STATUS_TEXT[status]}".encode())
    h = sha.hexdigest()
    # The version (5) is the 13th hex digit; the variant's two bits top the 17th.
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


# A hex digit with its top two bits made 10 (RFC 4122's variant).
_VARIANT = {f"{n:x}": f"{(n & 0x3) | 0x8:x}" for n in range(16)}


# The body of a push with no courier_info, per status: what `dumps` writes for it.
_BARE_BODIES = {s: f'{{"delivery_status":{encode_basestring(s.value)}}}' for s in Status}


def push_body(status: Status, courier_info: Mapping[str, Any] | None) -> str:
    """The delivery-status body; courier_info fields that are absent are left out."""
    if not courier_info:
        return _BARE_BODIES[status]
    body: dict[str, Any] = {"delivery_status": status.value}
    info = drop_nulls(dict(courier_info)) if courier_info else None
    if info:
        body["courier_info"] = info
    return dumps(body)


# The outcomes, read off the enum once: each `Outcome.X` is an attribute lookup through
# the enum's class, about 0.9k instructions on CPython 3.11.
_ACCEPTED, _DUPLICATE, _STALE = Outcome.ACCEPTED, Outcome.DUPLICATE, Outcome.STALE
_CANCELLED, _EXPIRED, _WRONG_COURIER = Outcome.CANCELLED, Outcome.EXPIRED, Outcome.WRONG_COURIER


def decide(
    order: Order | None,
    event: StatusEvent,
    *,
    duplicate: bool,
    profile: Mapping[str, Any] | None,
    received_at: str,
) -> Decision:
    """What `event` does to `order` (None: not seen yet). Pure: no clock, no I/O.

    `duplicate` says the event_id was seen before; `profile` is the courier's retained
    courier_info, used when the event carries none; `received_at` dates transitions of
    events without a `ts`.
    """
    current = order or Order(event.order_id)
    if duplicate:
        return Decision(_DUPLICATE, current)
    state = current.state
    if state == CANCELLED:
        return Decision(_CANCELLED, current)
    if state == EXPIRED:
        return Decision(_EXPIRED, current)
    if current.courier_id is not None and current.courier_id != event.courier_id:
        return Decision(_WRONG_COURIER, current)
    have, want = _RANK[state], _RANK[STATUS_TEXT[event.status]]
    if want <= have:
        return Decision(_STALE, current)

    at = event.ts or received_at
    info = event.courier_info if event.courier_info is not None else profile
    oid, status, clocked = event.order_id, event.status, event.ts is not None
    transitions: list[Transition] = []
    pushes: list[Push] = []
    for s in CHAIN[have + 1 : want + 1]:
        own = s is status  # the event's own status; those before it are filled in
        source = event.source if own else "fill"
        transitions.append(
            Transition(
                oid, s, not own, event.event_id, at, source, event.where if own else None, clocked
            )
        )
        body = push_body(s, info) if info else _BARE_BODIES[s]
        pushes.append(Push(oid, s, body, idempotency_key(oid, s), source))
    # `dataclasses.replace` spelled out (it cost a tenth of `decide`), by position (by
    # keyword, 4k instructions more). A field added to Order has a default and would
    # silently reset here: tests/test_lifecycle.py checks that an accepted status
    # carries every other field over, whatever fields Order has.
    after = Order(
        current.order_id,
        STATUS_TEXT[status],
        event.courier_id,
        current.held,
        at,
        current.confirmed_at,
        current.ready_at,
        current.assigned_at,
        event.ts,
    )
    return Decision(_ACCEPTED, after, tuple(transitions), tuple(pushes))


def cancel(order: Order | None, order_id: str) -> Order:
    """The order after `courierd order cancel`; refused once it is dropped off."""
    current = order or Order(order_id)
    if current.state == Status.DROPOFF.value:
        raise InputError(f"order {order_id} was already dropped off; it cannot be cancelled")
    if current.state not in CANCELLABLE and not current.cancelled:
        raise InputError(f"order {order_id} is {current.state}; it cannot be cancelled")
    return Order(order_id, CANCELLED, current.courier_id)

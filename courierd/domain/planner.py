"""What a batch of MQTT inputs does to the store: a pure fold over `lifecycle.decide`.

The ingest process loads a `Snapshot` of the rows the batch touches, calls
`plan_batch`, and writes the resulting `Effects` in the same transaction. Keeping this
pure lets the property tests replay arbitrary batchings, duplicates and crashes
without a database.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from courierd.domain.lifecycle import decide
from courierd.domain.model import (
    REJECTED_OUTCOMES,
    Assignment,
    DeadLetter,
    Decision,
    Input,
    LocationFix,
    Order,
    Outcome,
    ProfileUpdate,
    Push,
    StatusEvent,
    Transition,
)


@dataclass(slots=True)
class Snapshot:
    """The stored rows a batch needs: its orders, which event ids were seen, profiles.

    Rows that could not be read (an unknown state, a profile that is not JSON) are
    named in `corrupt_orders` / `corrupt_profiles`: events that need them are refused
    (`corrupt_row`) instead of stopping ingest for everyone.
    """

    orders: dict[str, Order] = field(default_factory=dict)
    seen_event_ids: set[str] = field(default_factory=set)
    profiles: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    corrupt_orders: set[str] = field(default_factory=set)
    corrupt_profiles: set[str] = field(default_factory=set)


@dataclass(slots=True)
class Effects:
    """Everything one batch writes, in one transaction."""

    orders: dict[str, Order] = field(default_factory=dict)
    transitions: list[Transition] = field(default_factory=list)
    pushes: list[Push] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    event_ids: dict[str, str] = field(default_factory=dict)  # event id → its order id
    profiles: dict[str, Mapping[str, Any] | None] = field(default_factory=dict)
    locations: dict[str, LocationFix] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)


def plan_batch(snapshot: Snapshot, inputs: Iterable[Input], *, received_at: str) -> Effects:
    """Decide every input in arrival order; later inputs see earlier ones' effects."""
    orders = dict(snapshot.orders)
    seen = set(snapshot.seen_event_ids)
    profiles: dict[str, Mapping[str, Any] | None] = dict(snapshot.profiles)
    corrupt_profiles = set(snapshot.corrupt_profiles)
    fx = Effects()
    for item in inputs:
        if isinstance(item, StatusEvent):
            if item.order_id in snapshot.corrupt_orders or (
                item.courier_info is None and item.courier_id in corrupt_profiles
            ):
                decision = Decision(Outcome.CORRUPT_ROW, Order(item.order_id))
            else:
                decision = decide(
                    orders.get(item.order_id),
                    item,
                    duplicate=item.event_id in seen,
                    profile=profiles.get(item.courier_id),
                    received_at=received_at,
                )
            if item.event_id not in seen and decision.outcome is not Outcome.CORRUPT_ROW:
                seen.add(item.event_id)
                fx.event_ids[item.event_id] = item.order_id
            fx.counts[decision.outcome.value] += 1
            if decision.outcome in REJECTED_OUTCOMES:
                fx.dead_letters.append(_rejected(item, decision.outcome))
                continue
            if decision.transitions:
                orders[item.order_id] = fx.orders[item.order_id] = decision.order
                fx.transitions.extend(decision.transitions)
                fx.pushes.extend(decision.pushes)
        elif isinstance(item, LocationFix):
            latest = fx.locations.get(item.courier_id)
            if latest is None or item.ts >= latest.ts:
                fx.locations[item.courier_id] = item
            fx.counts["location"] += 1
        elif isinstance(item, ProfileUpdate):
            profiles[item.courier_id] = fx.profiles[item.courier_id] = item.courier_info
            corrupt_profiles.discard(item.courier_id)  # a new profile replaces the bad row
            fx.counts["profile"] += 1
        elif isinstance(item, Assignment):
            if item.order_id in snapshot.corrupt_orders:
                fx.dead_letters.append(
                    DeadLetter(
                        "dispatch/assignments",
                        item.raw,
                        Outcome.CORRUPT_ROW.value,
                        f"the stored row of order {item.order_id} is unreadable",
                    )
                )
                fx.counts[Outcome.CORRUPT_ROW.value] += 1
                continue
            current = orders.get(item.order_id) or Order(item.order_id)
            bound = replace(current, courier_id=item.courier_id)
            orders[item.order_id] = fx.orders[item.order_id] = bound
            fx.counts["assignment"] += 1
        else:
            fx.dead_letters.append(item)
            fx.counts["rejected"] += 1
    return fx


def _rejected(event: StatusEvent, outcome: Outcome) -> DeadLetter:
    """A refused event, kept as a dead letter with its original payload."""
    if outcome is Outcome.CANCELLED:
        detail = f"order {event.order_id} is cancelled"
    elif outcome is Outcome.WRONG_COURIER:
        detail = f"order {event.order_id} is bound to another courier than {event.courier_id}"
    else:
        detail = f"a stored row event {event.event_id} needs (order or profile) is unreadable"
    return DeadLetter(f"couriers/{event.courier_id}/status", event.raw, outcome.value, detail)

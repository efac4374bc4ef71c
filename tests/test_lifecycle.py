"""The lifecycle core: the machine is the definition, `decide` follows it, purely."""

from __future__ import annotations

import dataclasses
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from courierd.domain import lifecycle
from courierd.domain.lifecycle import CHAIN, DeliveryLifecycle, decide
from courierd.domain.model import (
    CANCELLED,
    EXPIRED,
    NEW,
    Order,
    Outcome,
    Status,
    StatusEvent,
    dumps,
)
from courierd.errors import InputError

NOW = "2026-01-01T00:00:00.000Z"


def event(status: Status, event_id: str = "e1", courier: str = "c1", **kw: object) -> StatusEvent:
    return StatusEvent(event_id, "o1", courier, status, **kw)  # type: ignore[arg-type]


class Model:
    """An object the real machine can be bound to (`model=`, `state_field=`)."""

    def __init__(self, state: str) -> None:
        self.state = state


def test_chain_read_off_the_machine_is_the_contract_chain() -> None:
    """The table derived from the class is the chain of CONTRACT.md, in order."""
    assert [s.value for s in CHAIN] == [
        "dasher_confirmed",
        "arriving_at_store",
        "arrived_at_store",
        "dasher_out_for_delivery",
        "dropoff",
    ]
    assert set(CHAIN) == set(Status)


@pytest.mark.parametrize("state", sorted(lifecycle.STATE_VALUES))
def test_table_agrees_with_the_real_machine(state: str) -> None:
    """For every state, the bound machine walks the same steps the table decides."""
    for target in CHAIN:
        model = Model(state)
        machine = DeliveryLifecycle(model=model, state_field="state")
        d = decide(
            Order("o1", state), event(target), duplicate=False, profile=None, received_at=NOW
        )
        if d.outcome is Outcome.ACCEPTED:
            for t in d.transitions:  # the machine walks the same steps, one advance each
                machine.send("advance")
                assert model.state == t.status.value
        elif state not in (CANCELLED, EXPIRED):
            assert lifecycle._RANK[target.value] <= lifecycle._RANK[state]
    model = Model(state)
    machine = DeliveryLifecycle(model=model, state_field="state")
    can_cancel = "cancel" in {e.id for e in machine.allowed_events}
    assert can_cancel == (state in lifecycle.CANCELLABLE)


def test_stored_state_values_are_validated() -> None:
    """A state value the machine does not know is recognised as corrupt, not accepted."""
    assert lifecycle.valid_state("arrived_at_store") and lifecycle.valid_state("cancelled")
    assert not lifecycle.valid_state("delivered") and not lifecycle.valid_state(None)


def test_first_event_accepted_and_binds_courier() -> None:
    """dasher_confirmed on an unknown order is accepted, pushed once, and binds the courier."""
    d = decide(None, event(Status.DASHER_CONFIRMED), duplicate=False, profile=None, received_at=NOW)
    assert d.outcome is Outcome.ACCEPTED
    assert d.order == Order("o1", "dasher_confirmed", "c1", status_at=NOW)
    assert [p.status for p in d.pushes] == [Status.DASHER_CONFIRMED]
    assert d.pushes[0].body == '{"delivery_status":"dasher_confirmed"}'


def test_skip_ahead_fills_inferred_statuses_in_order() -> None:
    """arrived_at_store first makes confirmed and arriving inferred, then its own."""
    d = decide(
        None,
        event(Status.ARRIVED_AT_STORE, ts="2024-01-15T18:05:00.000Z"),
        duplicate=False,
        profile=None,
        received_at=NOW,
    )
    assert [(t.status.value, t.inferred) for t in d.transitions] == [
        ("dasher_confirmed", True),
        ("arriving_at_store", True),
        ("arrived_at_store", False),
    ]
    assert all(t.at == "2024-01-15T18:05:00.000Z" for t in d.transitions)
    assert [p.status for p in d.pushes] == list(CHAIN[:3])


def test_stale_duplicate_cancelled_wrong_courier_change_nothing() -> None:
    """Each refusal outcome leaves the order as it was and pushes nothing."""
    at = Order("o1", "arrived_at_store", "c1")
    cases = [
        (at, event(Status.ARRIVING_AT_STORE), False, Outcome.STALE),
        (at, event(Status.ARRIVED_AT_STORE), False, Outcome.STALE),
        (at, event(Status.DROPOFF), True, Outcome.DUPLICATE),
        (Order("o1", CANCELLED, "c1"), event(Status.DROPOFF), False, Outcome.CANCELLED),
        (Order("o1", EXPIRED, "c1"), event(Status.DROPOFF), False, Outcome.EXPIRED),
        (at, event(Status.DROPOFF, courier="c2"), False, Outcome.WRONG_COURIER),
    ]
    for order, ev, dup, outcome in cases:
        d = decide(order, ev, duplicate=dup, profile=None, received_at=NOW)
        assert (d.outcome, d.order, d.pushes, d.transitions) == (outcome, order, (), ())


def test_courier_info_from_event_else_profile_and_nulls_left_out() -> None:
    """The event's courier_info wins; the profile fills in; null fields are not sent."""
    profile = {"full_name": "Mike Driver", "phone": None, "vehicle": {"make": None}}
    d = decide(
        None, event(Status.DASHER_CONFIRMED), duplicate=False, profile=profile, received_at=NOW
    )
    assert d.pushes[0].body == (
        '{"delivery_status":"dasher_confirmed","courier_info":{"full_name":"Mike Driver"}}'
    )
    own = {"full_name": "Ann", "vehicle": {"color": "Blue"}}
    d = decide(
        None,
        event(Status.DASHER_CONFIRMED, courier_info=own),
        duplicate=False,
        profile=profile,
        received_at=NOW,
    )
    assert '"courier_info":{"full_name":"Ann","vehicle":{"color":"Blue"}}' in d.pushes[0].body


def test_idempotency_key_is_stable_and_distinct() -> None:
    """The same push always gets the same key; different statuses or orders differ."""
    k = lifecycle.idempotency_key
    assert k("o1", Status.DROPOFF) == k("o1", Status.DROPOFF)
    assert len({k("o1", s) for s in Status} | {k("o2", s) for s in Status}) == 10


@given(st.text(min_size=1), st.sampled_from(list(Status)))
def test_idempotency_key_is_uuid5_of_order_and_status(order_id: str, status: Status) -> None:
    """The key is uuid5(NAMESPACE_URL, "courierd:{order}:{status}"), written out by hand:
    keys of pushes made before and after must match (the same push, the same key)."""
    try:
        expected = str(uuid.uuid5(uuid.NAMESPACE_URL, f"courierd:{order_id}:{status.value}"))
    except UnicodeEncodeError:  # lone surrogates: ids never carry them (parse refuses)
        with pytest.raises(UnicodeEncodeError):
            lifecycle.idempotency_key(order_id, status)
        return
    assert lifecycle.idempotency_key(order_id, status) == expected


@pytest.mark.parametrize("info", [None, {}, {"phone": None}, {"vehicle": {"color": None}}])
def test_a_body_without_courier_info_is_what_dumps_writes(info: dict[str, object] | None) -> None:
    """The bodies without courier_info (precomputed per status) are the encoder's text."""
    for status in Status:
        assert lifecycle.push_body(status, info) == dumps({"delivery_status": status.value})


def test_cancel_refused_after_dropoff_allowed_before() -> None:
    """Cancelling is allowed until dropoff; after dropoff it is an input error."""
    assert lifecycle.cancel(None, "o1").state == CANCELLED
    assert lifecycle.cancel(Order("o1", "arrived_at_store", "c1"), "o1").courier_id == "c1"
    with pytest.raises(InputError, match="already dropped off"):
        lifecycle.cancel(Order("o1", "dropoff"), "o1")


@given(st.sampled_from(sorted(lifecycle.STATE_VALUES)), st.sampled_from(list(Status)))
def test_decide_is_pure(state: str, status: Status) -> None:
    """Same inputs, same decision: no clock, no randomness inside."""
    order = Order("o1", state, "c1") if state != NEW else None
    a = decide(order, event(status), duplicate=False, profile=None, received_at=NOW)
    b = decide(order, event(status), duplicate=False, profile=None, received_at=NOW)
    assert a == b


def test_an_accepted_status_carries_every_other_field_of_the_order() -> None:
    """`decide` builds the order afterwards field by field: what the event does not
    change (the hold, OneTablet's times, the assignment's ts, any field added later)
    is the order's before, as `dataclasses.replace` would keep it."""
    values: dict[str, object] = {}
    for f in dataclasses.fields(Order):
        values[f.name] = True if f.type in ("bool", bool) else f"kept-{f.name}"
    values.update(order_id="o1", state=Status.ARRIVING_AT_STORE.value, courier_id="c1")
    before = Order(**values)  # type: ignore[arg-type]
    ev = event(Status.DROPOFF, ts="2026-01-01T00:00:00Z")
    d = decide(before, ev, duplicate=False, profile=None, received_at="now")
    assert d.outcome is Outcome.ACCEPTED
    assert d.order == dataclasses.replace(
        before,
        state=Status.DROPOFF.value,
        courier_id="c1",
        status_at="2026-01-01T00:00:00Z",
        status_ts="2026-01-01T00:00:00Z",
    )
    assert [t.status for t in d.transitions] == list(CHAIN[2:])
    assert [(t.inferred, t.source) for t in d.transitions] == [(True, "fill")] * 2 + [
        (False, "app")
    ]

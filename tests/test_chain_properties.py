"""Property tests: random event streams through the pure pipeline (CONTRACT.md section 4).

A `Pipeline` plays the daemon's part with plain values: it cuts the stream into
batches, plans each with `plan_batch`, and either "commits" the effects or "crashes"
(throws them away and gets the same messages redelivered, as the broker would).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from courierd.domain import lifecycle
from courierd.domain.lifecycle import CHAIN
from courierd.domain.model import CANCELLED, NEW, Input, Order, Status, StatusEvent
from courierd.domain.planner import Snapshot, plan_batch
from courierd.errors import InputError

NOW = "2026-01-01T00:00:00.000Z"
RANK = {s: i for i, s in enumerate(CHAIN)}


@dataclass
class Pipeline:
    orders: dict[str, Order] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    pushed: dict[str, list[Status]] = field(default_factory=lambda: defaultdict(list))
    pushes_after_cancel: int = 0

    def batch(self, inputs: list[Input], *, crash: bool) -> bool:
        """Plan one batch; commit it unless `crash`. Returns whether it committed."""
        fx = plan_batch(Snapshot(dict(self.orders), set(self.seen)), inputs, received_at=NOW)
        if crash:
            return False
        self.orders.update(fx.orders)
        self.seen.update(fx.event_ids)
        for p in fx.pushes:
            if self.orders[p.order_id].state == CANCELLED:
                self.pushes_after_cancel += 1
            self.pushed[p.order_id].append(p.status)
        return True

    def run(self, inputs: list[Input], cuts: list[int], crashes: list[bool]) -> None:
        """Feed in batches of sizes `cuts`; a crashed batch is redelivered whole."""
        queue, i = list(inputs), 0
        while queue:
            size = max(1, cuts[i % len(cuts)])
            crash = crashes[i % len(crashes)] and i < 50  # crashes end, as restarts do
            if self.batch(queue[:size], crash=crash):
                queue = queue[size:]
            i += 1

    def cancel(self, order_id: str) -> None:
        with contextlib.suppress(InputError):  # refused after dropoff, as the CLI does
            self.orders[order_id] = lifecycle.cancel(self.orders.get(order_id), order_id)


statuses = st.sampled_from(list(Status))
cuts = st.lists(st.integers(1, 6), min_size=1, max_size=5)
crashes = st.lists(st.booleans(), min_size=1, max_size=5)


def ev(
    i: int, status: Status, order: str = "o1", courier: str = "c1", eid: str | None = None
) -> StatusEvent:
    return StatusEvent(eid or f"e{i}", order, courier, status)


def assert_prefix(pushed: list[Status]) -> None:
    assert pushed == list(CHAIN[: len(pushed)]), pushed


@st.composite
def mixed_streams(draw: st.DrawFn) -> list[tuple[str, object]]:
    """Events over two orders and two couriers, reused event ids, and cancels."""
    n = draw(st.integers(1, 30))
    ops: list[tuple[str, object]] = []
    for i in range(n):
        if draw(st.integers(0, 9)) == 0:
            ops.append(("cancel", draw(st.sampled_from(["o1", "o2"]))))
            continue
        eid = f"e{draw(st.integers(0, i))}"  # often an id seen before
        ops.append(
            (
                "event",
                ev(
                    i,
                    draw(statuses),
                    draw(st.sampled_from(["o1", "o2"])),
                    draw(st.sampled_from(["c1", "c1", "c2"])),
                    eid,
                ),
            )
        )
    return ops


@settings(max_examples=300)
@given(mixed_streams(), cuts, crashes)
def test_pushes_are_always_a_chain_prefix_once_each(ops, cut, crash) -> None:
    """Whatever arrives (dupes, reorders, skips, other couriers, cancels, crashes), every
    order's pushes are a prefix of the chain, in order, each once, none after a cancel."""
    p = Pipeline()
    segment: list[Input] = []
    for kind, value in [*ops, ("cancel", None)]:
        if kind == "event":
            segment.append(value)  # type: ignore[arg-type]
            continue
        p.run(segment, cut, crash)
        segment = []
        if value is not None:
            p.cancel(value)  # type: ignore[arg-type]
    for order_id, pushed in p.pushed.items():
        assert_prefix(pushed)
        state = p.orders[order_id].state
        if state != CANCELLED:  # the state is the last status pushed
            assert state == CHAIN[len(pushed) - 1].value
    assert p.pushes_after_cancel == 0


@st.composite
def one_courier_streams(draw: st.DrawFn) -> list[StatusEvent]:
    """Unique events for one order and courier, each possibly repeated (redelivery)."""
    events = [ev(i, s) for i, s in enumerate(draw(st.lists(statuses, min_size=1, max_size=12)))]
    repeated = events + draw(st.lists(st.sampled_from(events), max_size=8))
    return draw(st.permutations(repeated))


@settings(max_examples=300)
@given(one_courier_streams(), cuts, crashes)
def test_final_state_is_furthest_status_seen(stream, cut, crash) -> None:
    """Without cancels, the order ends at the furthest status any event carried, and
    every status up to it was pushed exactly once; own statuses are not marked inferred."""
    p = Pipeline()
    p.run(list(stream), cut, crash)
    furthest = max((e.status for e in stream), key=RANK.__getitem__)
    assert p.orders["o1"].state == furthest.value
    assert p.pushed["o1"] == list(CHAIN[: RANK[furthest] + 1])


@settings(max_examples=200)
@given(one_courier_streams(), st.data())
def test_deciding_is_order_insensitive_in_final_state(stream, data) -> None:
    """Any two arrival orders of the same events end in the same state."""
    other = data.draw(st.permutations(stream))
    a, b = Pipeline(), Pipeline()
    a.run(list(stream), [3], [False])
    b.run(list(other), [1], [False])
    assert a.orders == b.orders


@settings(max_examples=200)
@given(mixed_streams(), st.data())
def test_a_duplicate_event_id_never_changes_anything(ops, data) -> None:
    """Replaying a seen event_id, with any content, adds no transition, push or state."""
    events = [v for k, v in ops if k == "event"]
    if not events:
        return
    p = Pipeline()
    p.run(events, [4], [False])
    old = data.draw(st.sampled_from(events))
    replay = StatusEvent(
        old.event_id,
        data.draw(st.sampled_from(["o1", "o2"])),
        data.draw(st.sampled_from(["c1", "c2"])),
        data.draw(statuses),
    )
    fx = plan_batch(Snapshot(dict(p.orders), set(p.seen)), [replay], received_at=NOW)
    assert (fx.orders, fx.transitions, fx.pushes, fx.dead_letters) == ({}, [], [], [])
    assert fx.counts == {"duplicate": 1}


@given(st.lists(statuses, min_size=1, max_size=10))
def test_events_from_another_courier_never_push(seq) -> None:
    """Once c1 holds the order, c2's events are dead-lettered and push nothing."""
    p = Pipeline()
    p.run([ev(0, Status.DASHER_CONFIRMED)], [1], [False])
    fx = plan_batch(
        Snapshot(dict(p.orders), set(p.seen)),
        [ev(i + 1, s, courier="c2") for i, s in enumerate(seq)],
        received_at=NOW,
    )
    assert fx.pushes == [] and fx.orders == {}
    assert [d.reason for d in fx.dead_letters] == ["wrong_courier"] * len(seq)


def test_new_order_state_is_new() -> None:
    """An order nobody has moved starts in `new`."""
    assert Order("x").state == NEW

"""Property tests: random event streams through the pure pipeline (CONTRACT.md section 4).

A `Pipeline` plays the daemon's part with plain values: it cuts the stream into
batches, plans each with `plan_batch`, and either "commits" the effects or "crashes"
(throws them away and gets the same messages redelivered, as the broker would).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from courierd.domain import lifecycle
from courierd.domain.lifecycle import CHAIN
from courierd.domain.model import CANCELLED, NEW, Input, Order, Status, StatusEvent
from courierd.domain.planner import Snapshot, plan_batch
from courierd.errors import InputError

NOW = "2026-01-01T00:00:00.000Z"
T_NOW = 1_767_225_600.0  # the same instant, as courierd's clock gives it
RANK = {s: i for i, s in enumerate(CHAIN)}

# (kind, value): an "event" carries its StatusEvent, a cancel step its order id,
# "deliver" nothing.
Op = tuple[str, StatusEvent | str | None]


@dataclass
class Pipeline:
    orders: dict[str, Order] = field(default_factory=dict)
    seen: set[tuple[str, str]] = field(default_factory=set)
    pushed: dict[str, list[Status]] = field(default_factory=lambda: defaultdict(list))
    pushes_after_cancel: int = 0

    def batch(self, inputs: list[Input], *, crash: bool) -> bool:
        """Plan one batch; commit it unless `crash`. Returns whether it committed."""
        fx = plan_batch(Snapshot(dict(self.orders), set(self.seen)), inputs, now=T_NOW)
        if crash:
            return False
        self.orders.update(fx.orders)
        self.seen.update(fx.event_ids)
        for p in fx.pushes:
            if self.orders[p.order_id].state == CANCELLED:
                self.pushes_after_cancel += 1
            self.pushed[p.order_id].append(p.status)
        return True

    def run(self, inputs: Sequence[Input], cuts: list[int], crashes: list[bool]) -> None:
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
def mixed_streams(draw: st.DrawFn) -> list[Op]:
    """Events over two orders and two couriers, reused event ids, and cancels."""
    n = draw(st.integers(1, 30))
    ops: list[Op] = []
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
def test_pushes_are_always_a_chain_prefix_once_each(
    ops: list[Op], cut: list[int], crash: list[bool]
) -> None:
    """Whatever arrives (dupes, reorders, skips, other couriers, cancels, crashes), every
    order's pushes are a prefix of the chain, in order, each once, none after a cancel."""
    p = Pipeline()
    segment: list[Input] = []
    for _, value in [*ops, ("cancel", None)]:
        if isinstance(value, StatusEvent):  # kind "event"
            segment.append(value)
            continue
        p.run(segment, cut, crash)
        segment = []
        if value is not None:
            p.cancel(value)
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
def test_final_state_is_furthest_status_seen(
    stream: list[StatusEvent], cut: list[int], crash: list[bool]
) -> None:
    """Without cancels, the order ends at the furthest status any event carried, and
    every status up to it was pushed exactly once; own statuses are not marked inferred."""
    p = Pipeline()
    p.run(list(stream), cut, crash)
    furthest = max((e.status for e in stream), key=RANK.__getitem__)
    assert p.orders["o1"].state == furthest.value
    assert p.pushed["o1"] == list(CHAIN[: RANK[furthest] + 1])


@settings(max_examples=200)
@given(one_courier_streams(), st.data())
def test_deciding_is_order_insensitive_in_final_state(
    stream: list[StatusEvent], data: st.DataObject
) -> None:
    """Any two arrival orders of the same events end in the same state."""
    other = data.draw(st.permutations(stream))
    a, b = Pipeline(), Pipeline()
    a.run(list(stream), [3], [False])
    b.run(list(other), [1], [False])
    assert a.orders == b.orders


@settings(max_examples=200)
@given(mixed_streams(), st.data())
def test_a_duplicate_event_id_never_changes_anything(ops: list[Op], data: st.DataObject) -> None:
    """Replaying a seen event_id for its order, with any other content, adds no
    transition, push or state (ids are per order: CONTRACT.md 12)."""
    events = [v for _, v in ops if isinstance(v, StatusEvent)]
    if not events:
        return
    p = Pipeline()
    p.run(events, [4], [False])
    old = data.draw(st.sampled_from(events))
    replay = StatusEvent(
        old.event_id,
        old.order_id,
        data.draw(st.sampled_from(["c1", "c2"])),
        data.draw(statuses),
    )
    fx = plan_batch(Snapshot(dict(p.orders), set(p.seen)), [replay], now=T_NOW)
    assert (fx.orders, fx.transitions, fx.pushes, fx.dead_letters) == ({}, [], [], [])
    assert fx.counts == {"duplicate": 1}


@given(st.lists(statuses, min_size=1, max_size=10))
def test_events_from_another_courier_never_push(seq: list[Status]) -> None:
    """Once c1 holds the order, c2's events are dead-lettered and push nothing."""
    p = Pipeline()
    p.run([ev(0, Status.DASHER_CONFIRMED)], [1], [False])
    fx = plan_batch(
        Snapshot(dict(p.orders), set(p.seen)),
        [ev(i + 1, s, courier="c2") for i, s in enumerate(seq)],
        now=T_NOW,
    )
    assert fx.pushes == [] and fx.orders == {}
    assert [d.reason for d in fx.dead_letters] == ["wrong_courier"] * len(seq)


def test_new_order_state_is_new() -> None:
    """An order nobody has moved starts in `new`."""
    assert Order("x").state == NEW


@dataclass
class Outbox:
    """The pure pipeline plus a model of the outbox: pushes wait per order (FIFO), are
    held while a cancel is asked, dropped when it succeeds, and delivered in order."""

    pipe: Pipeline = field(default_factory=Pipeline)
    waiting: dict[str, list[Status]] = field(default_factory=lambda: defaultdict(list))
    delivered: dict[str, list[Status]] = field(default_factory=lambda: defaultdict(list))
    held: set[str] = field(default_factory=set)
    finished_cancels: set[str] = field(default_factory=set)
    after_cancel: int = 0

    def batch(self, inputs: list[Input], mode: str) -> bool:
        """mode: "ok", "crash" (nothing committed, redelivered), or "unacked" (committed,
        but the broker never got the ack: the same messages come again)."""
        fx = plan_batch(Snapshot(dict(self.pipe.orders), set(self.pipe.seen)), inputs, now=T_NOW)
        if mode == "crash":
            return False
        self.pipe.orders.update(fx.orders)
        self.pipe.seen.update(fx.event_ids)
        for p in fx.pushes:
            self.waiting[p.order_id].append(p.status)
        return mode == "ok"

    def deliver(self) -> None:
        for order_id, queue in self.waiting.items():
            if order_id in self.held:
                continue
            if order_id in self.finished_cancels and queue:
                self.after_cancel += 1
            self.delivered[order_id] += queue
            queue.clear()

    def hold(self, order_id: str) -> bool:
        """`order cancel` step 1: check and hold in one transaction (refused after dropoff)."""
        if order_id in self.held:
            return False
        try:
            lifecycle.cancel(self.pipe.orders.get(order_id), order_id)
        except InputError:
            return False
        self.held.add(order_id)
        return True

    def finish(self, order_id: str) -> None:
        """OneTablet accepted: cancelled, unsent pushes dropped."""
        self.held.discard(order_id)
        self.pipe.orders[order_id] = Order(order_id, CANCELLED)
        self.waiting[order_id].clear()
        self.finished_cancels.add(order_id)

    def revert(self, order_id: str) -> None:
        """OneTablet refused: the held pushes flow again, in order."""
        self.held.discard(order_id)


modes = st.lists(st.sampled_from(["ok", "ok", "crash", "unacked"]), min_size=1, max_size=5)


@st.composite
def racing_streams(draw: st.DrawFn) -> list[Op]:
    """Events, deliveries and cancels (hold, then finish or revert) interleaved."""
    ops: list[Op] = []
    for i in range(draw(st.integers(1, 40))):
        roll = draw(st.integers(0, 19))
        order = draw(st.sampled_from(["o1", "o2"]))
        if roll == 0:
            ops.append(("hold", order))
        elif roll == 1:
            ops.append((draw(st.sampled_from(["finish", "revert"])), order))
        elif roll < 6:
            ops.append(("deliver", None))
        else:
            eid = f"e{draw(st.integers(0, i))}"
            ops.append(("event", ev(i, draw(statuses), order, "c1", eid)))
    return ops


@settings(max_examples=400)
@given(racing_streams(), cuts, modes)
def test_cancel_races_and_redelivered_batches_keep_the_chain(
    ops: list[Op], cut: list[int], mode: list[str]
) -> None:
    """With cancels racing events (the hold, then OneTablet's answer), crashes before the
    commit and batches committed but redelivered (no ack), what OneTablet receives per
    order is a chain prefix in order, each once; nothing after a cancel went through;
    and nothing committed is lost: every push is delivered or dropped by a cancel. A
    cancelled order never had its dropoff delivered (the old read-then-overwrite race)."""
    box = Outbox()
    segment: list[Input] = []
    holding: set[str] = set()

    def flush() -> None:
        queue, i = list(segment), 0
        while queue:
            size = max(1, cut[i % len(cut)])
            how = mode[i % len(mode)] if i < 50 else "ok"
            if box.batch(queue[:size], how):
                queue = queue[size:]
            i += 1
        segment.clear()

    for kind, value in ops:
        if isinstance(value, StatusEvent):  # kind "event"
            segment.append(value)
            continue
        flush()
        if value is None:  # kind "deliver"
            box.deliver()
        elif kind == "hold" and box.hold(value):
            holding.add(value)
        elif kind in ("finish", "revert") and value in holding:
            holding.discard(value)
            getattr(box, kind)(value)
    flush()
    for order_id in list(holding):
        box.revert(order_id)
    box.deliver()
    assert box.after_cancel == 0
    for order_id, pushed in box.delivered.items():
        assert_prefix(pushed)
        state = box.pipe.orders[order_id].state
        if state != CANCELLED:  # nothing lost: the state is the last status delivered
            assert state == CHAIN[len(pushed) - 1].value
        else:
            assert Status.DROPOFF not in pushed
